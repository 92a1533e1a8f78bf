"""Start-up: the bundled models serve as `make serve` starts them; bad artifacts are refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, start_server, stop_server

pytestmark = pytest.mark.slow  # real server processes: start-up refusals


def test_service_starts_with_the_bundled_models(tmp_path: Path) -> None:
    srv = start_server(ROOT / "models", tmp_path / "server.log", default="shakespeare")
    try:
        with srv.client() as c:
            names = {m["name"] for m in c.get("/models").json()["models"]}
            assert names == {"shakespeare", "nietzsche"}
            r = c.post("/generate", json={"seed_text": "ROMEO:", "max_new_chars": 50})
            assert r.status_code == 200
            assert r.json()["model"] == "shakespeare"
            r = c.post("/generate", json={"model": "nietzsche", "seed_text": "The Will",
                                          "max_new_chars": 20, "temperature": 0})
            assert r.json()["seed_text"] == "the will"
            assert r.json()["lowercased"] is True
            # Issue 11, defect 10: 'İ' lowercases to 'i' + U+0307; name what the caller sent.
            r = c.post("/generate", json={"model": "nietzsche", "seed_text": "\u0130stanbul"})
            assert r.status_code == 422
            assert r.json()["error"]["message"] == (
                "seed_text has characters not in the vocabulary of model 'nietzsche': "
                "'\u0130' at 0")
    finally:
        stop_server(srv)
    assert "shakespeare on CPUExecutionProvider" in srv.log()


def start_expecting_failure(models: Path, default: str = "tiny", timeout: float = 60) -> str:
    env = {"CHARLSTM_MODELS_DIR": str(models), "CHARLSTM_DEFAULT_MODEL": default,
           "CHARLSTM_PORT": "0"}
    res = subprocess.run([sys.executable, "-m", "app"], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, **env})
    assert res.returncode == 2, res.stdout + res.stderr
    return res.stderr


@pytest.fixture
def broken_copy(tiny_models: Path, tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(tiny_models, target)
    return target


def test_truncated_onnx_file_is_refused_naming_the_file(broken_copy: Path) -> None:
    onnx = broken_copy / "tiny" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])
    err = start_expecting_failure(broken_copy)
    assert str(onnx) in err
    assert "cannot load" in err
    assert "Traceback" not in err


def test_metadata_that_disagrees_with_the_graph_is_refused(broken_copy: Path) -> None:
    meta = broken_copy / "tiny" / "model.json"
    meta.write_text(meta.read_text().replace('"h0"', '"hidden0"'))
    err = start_expecting_failure(broken_copy)
    assert "graph does not match model.json" in err
    assert str(broken_copy / "tiny" / "model.onnx") in err


def test_vocabulary_with_duplicates_is_refused(broken_copy: Path) -> None:
    import json

    path = broken_copy / "tiny" / "model.json"
    meta = json.loads(path.read_text())
    meta["vocab"][1] = meta["vocab"][0]
    path.write_text(json.dumps(meta))
    err = start_expecting_failure(broken_copy)
    assert str(path) in err
    assert "duplicate" in err


def test_missing_metadata_and_unknown_default_are_refused(broken_copy: Path) -> None:
    (broken_copy / "tiny" / "model.json").unlink()
    assert "model.json: missing" in start_expecting_failure(broken_copy)


def test_unknown_default_model_is_refused(tiny_models: Path) -> None:
    err = start_expecting_failure(tiny_models, default="nope")
    assert "default model 'nope'" in err


# --- issue 11, defect 9: what the models folder may hold ----------------------------------------
def test_a_model_folder_linking_outside_the_models_folder_is_refused(tiny_models: Path,
                                                                     tmp_path: Path) -> None:
    shutil.copytree(tiny_models / "tiny", tmp_path / "elsewhere")
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny").symlink_to(tmp_path / "elsewhere")
    err = start_expecting_failure(models)
    assert f"{models / 'tiny'}: a link to {tmp_path / 'elsewhere'}, outside the models folder" \
        in err


@pytest.mark.parametrize("name", ["model.json", "model.onnx"])
def test_a_file_linking_outside_the_models_folder_is_refused(broken_copy: Path, tmp_path: Path,
                                                             name: str) -> None:
    outside = tmp_path / f"outside-{name}"
    path = broken_copy / "tiny" / name
    shutil.move(path, outside)
    path.symlink_to(outside)
    err = start_expecting_failure(broken_copy)
    assert f"{path}: a link to {outside}, outside the models folder" in err
    assert "Traceback" not in err


def test_links_within_the_models_folder_are_served(broken_copy: Path, tmp_path: Path) -> None:
    blobs = broken_copy / ".blobs"  # hidden: not a model folder itself
    blobs.mkdir()
    shutil.move(broken_copy / "tiny" / "model.onnx", blobs / "tiny.onnx")
    (broken_copy / "tiny" / "model.onnx").symlink_to(Path("..") / ".blobs" / "tiny.onnx")
    (broken_copy / "latest").symlink_to("tiny", target_is_directory=True)
    srv = start_server(broken_copy, tmp_path / "server.log", default="latest")
    try:
        with srv.client() as c:
            assert {m["name"] for m in c.get("/models").json()["models"]} == {"tiny", "latest"}
    finally:
        stop_server(srv)


@pytest.mark.parametrize("name", ["model.json", "model.onnx"])
def test_a_fifo_in_place_of_a_model_file_is_refused_without_hanging(broken_copy: Path,
                                                                    name: str) -> None:
    """Opening a FIFO blocks until a writer comes: start-up used to hang with no message."""
    path = broken_copy / "tiny" / name
    path.unlink()
    os.mkfifo(path)
    err = start_expecting_failure(broken_copy, timeout=30)  # TimeoutExpired if it hangs
    assert f"{path}: is a FIFO (named pipe), not a regular file" in err
