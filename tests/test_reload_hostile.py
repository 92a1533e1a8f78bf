"""Hot reload keeps what start-up promises (issue 26, point 2): a model.json that is a FIFO, a
link out of the models folder or a huge file is refused by its stat, never opened in a way that
blocks, never read past its bound. Before, a FIFO stopped the supervisor's loop (no reload
answered, no engine restarted, SIGTERM ignored) and a link to a 400 MB file was read whole."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.artifact import (
    MAX_METADATA_BYTES,
    ArtifactError,
    read_artifact_file,
    read_metadata,
)
from app.reload import fingerprint
from tests.conftest import start_server, stop_server

BIG = 64 * 2**20  # a sparse file: costs no disk, but reading it whole would cost this much


@pytest.fixture
def models(tiny_models: Path, tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(tiny_models, target)
    return target


def plant(models: Path, name: str, make_model_json: Callable[[Path], object]) -> Path:
    """A model folder `name`, a copy of tiny whose model.json `make_model_json` replaces."""
    folder = models / f".{name}.work"
    shutil.copytree(models / "tiny", folder)
    (folder / "model.json").unlink()
    make_model_json(folder / "model.json")
    folder.rename(models / name)
    return models / name


def sparse_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def run_with_timeout(fn: Callable[[], object], timeout_s: float) -> object:
    """fn() on a thread, its result or its exception; fails the test (instead of hanging it)
    when fn blocks."""
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"blocked for more than {timeout_s} s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


# --- the reads, in process ---------------------------------------------------------------------

def test_a_fifo_model_json_is_refused_by_stat_without_blocking(models: Path) -> None:
    folder = plant(models, "fifo", os.mkfifo)
    with pytest.raises(ArtifactError, match="is a FIFO"):
        run_with_timeout(lambda: read_metadata(folder), 5)
    run_with_timeout(lambda: fingerprint(folder), 5)


def test_a_fifo_swapped_in_after_the_stat_is_opened_without_blocking(
        models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race the stat alone cannot close: the name is a regular file when checked and a
    FIFO when opened. O_NONBLOCK opens it at once; fstat refuses it."""
    folder = plant(models, "race", os.mkfifo)
    regular = os.stat(models / "tiny" / "model.json")
    real_stat = Path.stat

    def stat_says_regular(self: Path, **kw: bool) -> os.stat_result:
        return regular if self.name == "model.json" else real_stat(self, **kw)

    monkeypatch.setattr(Path, "stat", stat_says_regular)
    with pytest.raises(ArtifactError, match="is a FIFO"):
        run_with_timeout(lambda: read_artifact_file(folder / "model.json", models, 1000), 5)


def test_a_model_json_over_the_bound_or_linked_outside_is_refused_unread(
        models: Path, tmp_path: Path) -> None:
    huge = sparse_file(tmp_path / "huge.json", BIG)
    folder = plant(models, "outside", lambda p: p.symlink_to(huge))
    with pytest.raises(ArtifactError, match="outside the models folder"):
        read_metadata(folder)
    inside = plant(models, "big", lambda p: sparse_file(p, MAX_METADATA_BYTES + 1))
    with pytest.raises(ArtifactError, match=f"more than the {MAX_METADATA_BYTES} bytes"):
        read_metadata(inside)
    assert fingerprint(folder) != fingerprint(inside)
    assert read_artifact_file(models / "tiny" / "model.json", models, MAX_METADATA_BYTES)


# --- under hot reload, a real `python -m app` --------------------------------------------------

@pytest.mark.slow  # real server processes
def test_hot_reload_refuses_a_fifo_and_an_outside_link_and_keeps_serving_and_draining(
        models: Path, tmp_path: Path) -> None:
    huge = sparse_file(tmp_path / "huge.json", BIG)
    srv = start_server(models, tmp_path / "server.log", drain_s="2", admin_local="true")
    try:
        fifo = plant(models, "fifo", os.mkfifo)
        plant(models, "linked", lambda p: p.symlink_to(huge))
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            began = time.monotonic()
            reply = c.post("/admin/reload")
            took = time.monotonic() - began
            assert reply.status_code == 200, reply.text
            refused = {r["name"]: r["reason"] for r in reply.json()["refused"]}
            # Named relative to the models folder: no server path reaches the caller.
            assert "fifo/model.json: is a FIFO (named pipe)" in refused["fifo"]
            assert "outside the models folder" in refused["linked"]
            assert str(tmp_path) not in reply.text
            assert {r["folder"] for r in reply.json()["refused"]} == {"fifo", "linked"}
            assert took < 10
            # The served model keeps serving, from every part of the service.
            assert c.get("/ready").status_code == 200
            gen = c.post("/generate", json={"seed_text": "A", "max_new_chars": 10})
            assert gen.status_code == 200
            assert len(gen.json()["text"]) == 10
            assert c.get("/models/fifo").status_code == 404
        # The watcher woke the loop for those folders too; it is still free to drain.
        began = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            code = srv.proc.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM did not stop the service within 20 s")
        assert code == 0
        assert time.monotonic() - began < 15
    finally:
        stop_server(srv)
    assert f"model folder {fifo} refused" in srv.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{srv.url}/health", timeout=1)
