"""`python -m app`: the supervisor. One engine process per model, N HTTP worker processes
sharing one listening socket, and this process watching them all.

- Start-up: every model folder is validated here first (a bad one stops start-up with its
  reason); engine processes load and warm their models; workers start once every engine
  is up, so the first request finds them ready.
- An engine process that dies is restarted (workers fail its requests in flight at once
  and report not ready meanwhile); one that keeps dying (5 times in a minute) stops the
  service with exit code 1, so an orchestrator restarts the whole thing.
- A worker that dies is restarted.
- SIGTERM / Ctrl-C: workers drain (CHARLSTM_DRAIN_S), then engines stop, exit 0. A second
  signal stops everything at once.

Hand-written rather than uvicorn's own `--workers` supervisor: that one knows nothing of
engine processes and closes the socket on SIGTERM, while a drain must keep answering 503.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.process
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from types import FrameType
from typing import Any

from app.artifact import ArtifactError, read_metadata
from app.engine.remote import engine_address
from app.lifecycle import alive_file
from app.runtime import check_graph_file
from app.settings import Settings

log = logging.getLogger("app.supervisor")

RESTARTS_ALLOWED = 5  # per RESTART_WINDOW_S, per engine, and for the workers together
RESTART_WINDOW_S = 60.0
ENGINE_START_TIMEOUT_S = 300.0
# An engine that has not touched its heartbeat file this long is hung (a deadlock, a stuck
# driver call): it is killed and restarted like one that died.
ENGINE_HUNG_AFTER_S = 10.0

Process = multiprocessing.process.BaseProcess


def default_workers() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


class Supervisor:
    def __init__(self, settings: Settings, folders: list[Path]) -> None:
        self.settings = settings
        self.folders = folders
        self.ctx = multiprocessing.get_context("spawn")
        self.run_dir = Path(tempfile.mkdtemp(prefix="charlstm-"))
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir()
        # Before any child starts: each one picks prometheus-client's multiprocess mode on
        # import when this is set.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        self.engines: dict[str, Process] = {}
        self.started_at: dict[str, float] = {}
        self.restarts: dict[str, deque[float]] = {f.name: deque() for f in folders}
        self.worker_restarts: deque[float] = deque()
        self.workers: list[Process] = []
        self.sock: socket.socket | None = None
        self.stopping = False
        self.signals = 0

    # --- processes ------------------------------------------------------------------------
    def start_engine(self, folder: Path) -> Process:
        from app.engine import process as engine_process

        sock_path = self.run_dir / f"{folder.name}.sock"
        sock_path.unlink(missing_ok=True)
        proc = self.ctx.Process(target=engine_process.main, name=f"engine-{folder.name}",
                                args=(folder, engine_address(self.run_dir, folder.name),
                                      self.settings))
        alive_file(engine_address(self.run_dir, folder.name)).unlink(missing_ok=True)
        proc.start()
        self.engines[folder.name] = proc
        self.started_at[folder.name] = time.monotonic()
        return proc

    def hung(self, name: str) -> bool:
        """Alive but silent: no heartbeat for ENGINE_HUNG_AFTER_S, or still not up long after
        it was started."""
        path = alive_file(engine_address(self.run_dir, name))
        try:
            silent = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return time.monotonic() - self.started_at[name] > ENGINE_START_TIMEOUT_S
        return silent > ENGINE_HUNG_AFTER_S

    def wait_engines_up(self) -> bool:
        """Until every engine has bound its socket; False if one died while starting."""
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.stopping:
                return False
            for name, proc in self.engines.items():
                if not proc.is_alive():
                    log.error("the engine of %s exited with code %s while starting", name,
                              proc.exitcode)
                    return False
            if all((self.run_dir / f"{n}.sock").exists() for n in self.engines):
                return True
            time.sleep(0.05)
        log.error("engines did not start within %.0f s", ENGINE_START_TIMEOUT_S)
        return False

    def start_worker(self) -> Process:
        from app import worker

        proc = self.ctx.Process(target=worker.main, name="http-worker",
                                args=(self.settings, self.sock, self.run_dir))
        proc.start()
        return proc

    # --- the watch --------------------------------------------------------------------------
    def run(self) -> int:
        # The port first: a busy one is reported at once, not after every model has loaded.
        self.sock = socket.socket(socket.AF_INET6 if ":" in self.settings.host
                                  else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((self.settings.host, self.settings.port))
        except OSError as exc:
            print(f"error: cannot listen on {self.settings.host}:{self.settings.port}: {exc}",
                  file=sys.stderr)
            self.stop_all()
            return 2
        for folder in self.folders:
            self.start_engine(folder)
        if not self.wait_engines_up():
            interrupted = self.stopping  # a signal during start-up is not a failure
            self.stop_all()
            return 0 if interrupted else 2
        self.sock.listen(2048)
        self.sock.set_inheritable(True)
        n = self.settings.http_workers or default_workers()
        self.workers = [self.start_worker() for _ in range(n)]
        s = self.settings
        print(f"serving {s.models_dir}/ at http://{s.host}:{s.port}/ (API docs at /docs; "
              f"{n} HTTP worker(s), {len(self.engines)} engine process(es))", flush=True)
        code = 0
        while not self.stopping:
            time.sleep(0.1)
            code = self.check()
            if code:
                break
        self.stop_all()
        return code

    def check(self) -> int:
        """Restart what died; a non-zero code when an engine keeps dying."""
        from prometheus_client import multiprocess

        now = time.monotonic()
        for folder in self.folders:
            proc = self.engines[folder.name]
            if self.stopping:
                continue
            if proc.is_alive() and self.hung(folder.name):
                log.error("the engine of %s stopped answering (pid %s); killing it",
                          folder.name, proc.pid)
                proc.kill()
                proc.join(5)
            if proc.is_alive():
                continue
            if proc.pid is not None:
                multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
            times = self.restarts[folder.name]
            while times and now - times[0] > RESTART_WINDOW_S:
                times.popleft()
            if len(times) >= RESTARTS_ALLOWED:
                log.error("the engine of %s died %d times in %.0f s; stopping the service",
                          folder.name, len(times) + 1, RESTART_WINDOW_S)
                return 1
            times.append(now)
            log.error("the engine of %s died (exit code %s); restarting it", folder.name,
                      proc.exitcode)
            self.start_engine(folder)
        for i, proc in enumerate(self.workers):
            if not proc.is_alive() and not self.stopping:
                if proc.pid is not None:
                    multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
                times = self.worker_restarts
                while times and now - times[0] > RESTART_WINDOW_S:
                    times.popleft()
                if len(times) >= RESTARTS_ALLOWED:
                    log.error("HTTP workers died %d times in %.0f s; stopping the service",
                              len(times) + 1, RESTART_WINDOW_S)
                    return 1
                times.append(now)
                log.error("an HTTP worker died (exit code %s); restarting it", proc.exitcode)
                self.workers[i] = self.start_worker()
        return 0

    def on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("signal %s: draining the HTTP workers for up to %.0f s",
                     signal.Signals(sig).name, self.settings.drain_s)
            self.stopping = True
        else:
            log.info("second signal: stopping now")
            for proc in [*self.workers, *self.engines.values()]:
                if proc.is_alive() and proc.pid is not None:
                    os.kill(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Workers first (they drain and answer 503 meanwhile), then the engines."""
        self.stopping = True
        self._stop(self.workers, self.settings.drain_s + 15)
        self._stop(list(self.engines.values()), 10)
        if self.sock is not None:
            self.sock.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    @staticmethod
    def _stop(procs: list[Process], timeout_s: float) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.join(max(deadline - time.monotonic(), 0.1))
            if proc.is_alive():
                log.error("%s (pid %s) did not stop in time; killing it", proc.name, proc.pid)
                proc.kill()
                proc.join(5)


def describe_settings() -> str:
    lines = []
    for name, field in Settings.model_fields.items():
        if name == "engine_dir":
            continue  # internal: set by this supervisor for its workers
        default: Any = field.default if field.default_factory is None else "[]"
        lines.append(f"  CHARLSTM_{name.upper():<26} {field.description} "
                     f"(default: {default})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m app",
        description="Serve every model folder in CHARLSTM_MODELS_DIR over HTTP: one engine "
                    "process per model, CHARLSTM_HTTP_WORKERS HTTP worker processes. "
                    "Everything is configured through the environment:",
        epilog=describe_settings(), formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from app.service import discover

        folders = discover(settings.models_dir)
        for folder in folders:
            check_graph_file(folder, read_metadata(folder).onnx.file)
        if settings.default_model not in {f.name for f in folders}:
            raise ArtifactError(
                f"default model {settings.default_model!r} is not in {settings.models_dir} "
                f"(found: {', '.join(f.name for f in folders)}); set CHARLSTM_DEFAULT_MODEL")
    except ArtifactError as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return 2
    if not settings.continuation_key:
        # One random key for every worker of this run, so any of them verifies a handle
        # another issued.
        settings = settings.model_copy(update={"continuation_key": secrets.token_hex(32)})
    sup = Supervisor(settings, folders)
    signal.signal(signal.SIGTERM, sup.on_signal)
    signal.signal(signal.SIGINT, sup.on_signal)
    return sup.run()
