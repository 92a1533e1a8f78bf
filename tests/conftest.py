"""Shared fixtures: corpora from ../shared/data, a tiny model trained and exported once per
session with the real CLI, and real servers on real ports."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CHARLSTM_DATA", ROOT.parent / "shared" / "data"))
FULL = os.environ.get("CHARLSTM_FULL") == "1"
ARTIFACTS = ROOT / "test-artifacts"


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    path = DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.fail(f"corpus missing: {path} (set CHARLSTM_DATA to the folder of the corpora)")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory, shakespeare_path: Path) -> Path:
    """The first 60k characters of tinyshakespeare: enough to learn a little in seconds."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(shakespeare_path.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


TEST_MODELS = ROOT / "tests" / "data" / "models"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding `tiny` (LSTM 2x48, trained and exported with the project's CLI,
    committed under tests/data/models): a copy, so a test may change it."""
    models = tmp_path_factory.mktemp("tiny") / "models"
    shutil.copytree(TEST_MODELS / "tiny", models / "tiny")
    return models


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    """A models folder whose `tiny` was trained and exported by the CLI in this session (as the
    committed one was), beside its run folder (`<models>/../run`): for the tests of training
    and exporting themselves."""
    root = tmp_path_factory.mktemp("trained")
    run = root / "run"
    models = root / "models"
    res = run_cli("training", "train", str(small_corpus), "-o", str(run), "--units", "48",
                  "--embedding-dim", "16", "--epochs", "2", "--seq-len", "50", "--batch-size",
                  "32", "--sample-length", "20", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("training", "export", str(run), "--name", "tiny", "--models-dir", str(models))
    assert res.returncode == 0, res.stderr[-3000:]
    return models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server(Protocol):
    """A running service, in another process or this one."""

    url: str

    def client(self, **kw: object) -> httpx.Client: ...
    def log(self) -> str: ...


@dataclass
class ProcessServer:
    """`python -m app` in a process group of its own."""

    url: str
    proc: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)  # type: ignore[arg-type]


def start_server(models_dir: Path, log_path: Path, default: str = "tiny",
                 **env: str) -> ProcessServer:
    port = free_port()
    full_env = {
        **os.environ, "PYTHONUNBUFFERED": "1", "CHARLSTM_MODELS_DIR": str(models_dir),
        "CHARLSTM_DEFAULT_MODEL": default, "CHARLSTM_PORT": str(port),
        "CHARLSTM_HOST": "127.0.0.1", **{f"CHARLSTM_{k.upper()}": v for k, v in env.items()},
    }
    log_file = log_path.open("w")
    # Its own process group, so stop_server can end the supervisor and every child together.
    proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=full_env,
                            stdout=log_file, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return ProcessServer(url, proc, log_path)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"server did not become ready:\n{log_path.read_text()}")


def stop_server(server: ProcessServer) -> None:
    """SIGTERM (the supervisor stops its engines and workers), then whatever is left of the
    process group is killed: a test never leaves server processes behind."""
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.proc.pid, signal.SIGKILL)


class InProcessServer:
    """The whole service in this process (`uvicorn app.main:app`'s layout: every model's engine
    loop on a thread), served by uvicorn with the worker's HTTP limits on a real port, so real
    clients talk to it; a test can also reach into `app`. Starts in well under a second."""

    def __init__(self, models_dir: Path, default: str = "tiny", **settings: Any) -> None:
        from app.main import create_app
        from app.settings import Settings
        from app.worker import uvicorn_config

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.settings = Settings(models_dir=models_dir, default_model=default, port=port,
                                 log_level="warning", **settings)
        # What the service logs while this server runs (any server of this process), with
        # tracebacks, for tests that read the log as they would a process's.
        self.records: list[str] = []
        self.handler = _ListHandler(self.records)
        logging.getLogger().addHandler(self.handler)
        self.app = create_app(self.settings)
        self.uvicorn = uvicorn.Server(uvicorn_config(self.app, self.settings))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the in-process server stopped while starting")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise RuntimeError("the in-process server did not become ready")

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)  # type: ignore[arg-type]

    def log(self) -> str:
        return "\n".join(self.records)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(15)
        logging.getLogger().removeHandler(self.handler)


class _ListHandler(logging.Handler):
    def __init__(self, records: list[str]) -> None:
        super().__init__(logging.INFO)
        self.records = records
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


@pytest.fixture(scope="session")
def server(tiny_models: Path) -> Iterator[InProcessServer]:
    """The service for API cases: in this process, shared by the whole session."""
    srv = InProcessServer(tiny_models, max_batch=64)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def unicode_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding `unicode`: a tiny untrained LSTM (tests/modelgen.py, no
    TensorFlow) whose vocabulary is tests.modelgen.UNICODE_VOCAB: CJK, Hangul, astral emoji
    with ZWJ, skin tone and flag parts, combining marks, U+2028/U+2029/U+0085, CR and controls."""
    from tests.modelgen import UNICODE_VOCAB, build_model

    models = tmp_path_factory.mktemp("unicode") / "models"
    build_model(models, "unicode", UNICODE_VOCAB, seed=25)
    return models
