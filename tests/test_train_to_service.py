"""From a text file to a served model in one command (issue 14): `train --name NAME --serve`
trains, exports and has the running service load the model; with no service at the URL,
`--serve` starts one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.artifact import read_metadata
from tests.conftest import ROOT, free_port, run_cli, start_server, stop_server

pytestmark = pytest.mark.slow  # TensorFlow and real server processes


def test_one_command_trains_exports_and_the_running_service_serves_the_model(
        tiny_models: Path, shakespeare_path: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    corpus = tmp_path / "my.txt"
    corpus.write_text(shakespeare_path.read_text(encoding="utf-8")[:5000], encoding="utf-8")
    srv = start_server(models, tmp_path / "server.log")
    try:
        res = run_cli("training", "train", str(corpus), "--name", "mine", "--serve",
                      "--url", srv.url, "--models-dir", str(models), "-o", str(tmp_path / "run"),
                      "--units", "16", "--embedding-dim", "8", "--layers", "1", "--epochs", "1",
                      "--seq-len", "50", "--batch-size", "8", "--sample-length", "10", "--quiet",
                      timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        assert f"exporting {tmp_path / 'run'} as {models / 'mine'}" in res.stdout
        assert f"serving mine (version 1) at {srv.url}/" in res.stdout
        with srv.client() as c:
            info = c.get("/models/mine").json()
            reply = c.post("/generate", json={"model": "mine", "seed_text": "",
                                              "max_new_chars": 40})
        assert info["created"] == read_metadata(models / "mine").created
        assert info["units"] == 16
        assert reply.status_code == 200
        assert reply.json()["usage"]["generated_chars"] == 40
        assert not [p.name for p in models.iterdir() if p.name.startswith(".")]

        # Again without --force: refused before any training.
        res = run_cli("training", "train", str(corpus), "--name", "mine", "--models-dir",
                      str(models), "-o", str(tmp_path / "run2"), timeout=120)
        assert res.returncode == 2
        assert "already exists: pass --force" in res.stderr
        assert not (tmp_path / "run2").exists()
    finally:
        stop_server(srv)
    assert "reload: " in srv.log()
    assert "Traceback" not in srv.log()


# One xdist worker trains the session's model for both of its users (`make test`: --dist loadgroup).
@pytest.mark.xdist_group("trained_tiny")
def test_serve_starts_a_service_on_the_models_folder_when_none_answers(
        trained_tiny: Path, tmp_path: Path) -> None:
    run = trained_tiny.parent / "run"  # the run the session fixture trained
    models = tmp_path / "models"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARLSTM_")}
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "training", "export", str(run), "--name", "mine",
             "--models-dir", str(models), "--serve", "--url", url],
            cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log,
            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError(log_path.read_text()[-3000:])
        # The configured default (shakespeare) is not there: the new model is the default.
        reply = httpx.post(f"{url}/generate", json={"seed_text": "", "max_new_chars": 20},
                           timeout=30)
        assert reply.json()["model"] == "mine"
        assert reply.json()["usage"]["generated_chars"] == 20
    finally:
        proc.terminate()  # the supervisor itself: `--serve` became `python -m app`
        code = proc.wait(60)
    out = log_path.read_text()
    assert code == 0, out[-3000:]
    assert f"nothing answers at {url}: starting the service on {models}/" in out
    assert f"serving {models}/ at {url}/" in out
