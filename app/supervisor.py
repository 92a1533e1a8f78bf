"""`python -m app`: the supervisor. One engine process per model, N HTTP worker processes
sharing one listening socket, and this process watching them all.

- Start-up: every model folder is validated here first (a bad one stops start-up with its
  reason); engine processes load and warm their models; workers start once every engine
  is up, so the first request finds them ready.
- An engine process that dies is restarted (workers fail its requests in flight at once
  and report not ready meanwhile); one that keeps dying (CHARLSTM_RESTARTS_ALLOWED times in
  CHARLSTM_RESTART_WINDOW_S) stops the service with exit code 1, so an orchestrator restarts
  the whole thing. An engine that is alive but silent (no heartbeat for CHARLSTM_ENGINE_HUNG_S:
  a deadlock, a stuck driver call) is killed and counts as one that died; a slower one (a
  CPU quota, a pause) is left alone, and so are its requests.
- A worker that dies is restarted, within the same budget for the workers together.
- Every child dies with this process (PR_SET_PDEATHSIG), even when it is SIGKILLed.
- PID 1 or not: in a container without an init this process is PID 1. Its signal handlers
  work there as anywhere (the kernel drops only signals PID 1 has no handler for), and it
  reaps the orphaned processes the kernel hands to PID 1, so none stays a zombie.
- Hot reload (app/reload.py): a new or changed model folder is loaded beside the version
  serving, on a change in the models folder (CHARLSTM_WATCH_MODELS), on SIGHUP, or on
  POST /admin/reload (asked over the control socket, answered when the round ends).
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
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import zmq
from pydantic import ValidationError

from app.artifact import ArtifactError, read_metadata
from app.lifecycle import alive_file, reap_orphans
from app.manifest import RELOAD_REQUEST, control_address
from app.reload import EngineProcess, FolderWatcher, Reloader, Version
from app.runtime import check_graph_file
from app.settings import Settings

log = logging.getLogger("app.supervisor")

TICK_S = 0.1

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
        self.reloader = Reloader(self, settings.models_dir, self.run_dir,
                                 settings.default_model, settings.drain_s,
                                 settings.engine_start_timeout_s)
        self.watcher: FolderWatcher | None = None
        self.restarts: dict[str, deque[float]] = {}
        self.worker_restarts: deque[float] = deque()
        self.workers: list[Process] = []
        self.sock: socket.socket | None = None
        self.zmq = zmq.Context()
        self.control: zmq.Socket[bytes] | None = None
        self.stopping = False
        self.signals = 0

    # --- processes ------------------------------------------------------------------------
    def launch_engine(self, version: Version) -> EngineProcess:
        from app.engine import process as engine_process

        proc = self.ctx.Process(target=engine_process.main, name=f"engine-{version.name}",
                                args=(version.snapshot, version.address, self.settings,
                                      version.reason_path))
        alive_file(version.address).unlink(missing_ok=True)  # a restart starts unheard
        proc.start()
        return proc

    def engine_exited(self, proc: EngineProcess) -> None:
        from prometheus_client import multiprocess

        if proc.pid is not None:
            multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]

    def wait_engines_up(self) -> bool:
        """Until every engine has bound its socket; False if one died while starting."""
        timeout_s = self.settings.engine_start_timeout_s
        deadline = time.monotonic() + timeout_s
        versions = list(self.reloader.current.values())
        while time.monotonic() < deadline:
            if self.stopping:
                return False
            for v in versions:
                assert v.proc is not None
                if not v.proc.is_alive():
                    print(f"error: cannot start: {v.load_error()}", file=sys.stderr,
                          flush=True)
                    return False
            if all(v.sock_path.exists() for v in versions):
                return True
            time.sleep(0.05)
        log.error("engines did not start within %.0f s", timeout_s)
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
        try:
            self.reloader.start(self.folders)
        except ArtifactError as exc:
            print(f"error: cannot start: {exc}", file=sys.stderr)
            self.stop_all()
            return 2
        if not self.wait_engines_up():
            interrupted = self.stopping  # a signal during start-up is not a failure
            self.stop_all()
            return 0 if interrupted else 2
        self.reloader.publish()
        self.sock.listen(2048)
        self.sock.set_inheritable(True)
        self.control = self.zmq.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(control_address(self.run_dir))
        n = self.settings.http_workers or default_workers()
        self.workers = [self.start_worker() for _ in range(n)]
        s = self.settings
        if s.watch_models:
            self.watcher = FolderWatcher(s.models_dir, self.reloader.wanted)
            self.watcher.start()
            self.reloader.wanted.set()  # what changed while the engines were starting
        print(f"serving {s.models_dir}/ at http://{s.host}:{s.port}/ (API docs at /docs; "
              f"{n} HTTP worker(s), {len(self.reloader.current)} engine process(es); "
              f"reloads models on {'a change in the folder, ' if s.watch_models else ''}"
              f"SIGHUP and POST /admin/reload)", flush=True)
        code = 0
        while not self.stopping:
            time.sleep(TICK_S)
            code = self.check()
            if code:
                break
            self.reload_tick()
            if os.getpid() == 1:
                self.reap_orphans()
        self.stop_all()
        return code

    def reload_tick(self) -> None:
        assert self.control is not None
        while True:
            try:
                ident, payload = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if payload == RELOAD_REQUEST:
                self.reloader.request(ident)
        for ident, report in self.reloader.tick(time.monotonic()):
            try:
                self.control.send_multipart([ident, report.model_dump_json().encode()],
                                            zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # the worker is gone
                log.debug("could not answer a reload request: %s", exc)

    def check(self) -> int:
        """Restart what died; a non-zero code when an engine keeps dying."""
        from prometheus_client import multiprocess

        s = self.settings
        now = time.monotonic()
        for version in self.reloader.current.values():
            proc = version.proc
            if proc is None or self.stopping:
                continue
            if proc.is_alive() and self.hung(version):
                log.error("the engine of %s stopped answering (pid %s); killing it",
                          version.label, proc.pid)
                proc.kill()
                proc.join(5)
            if proc.is_alive():
                continue
            self.engine_exited(proc)
            times = self.restarts.setdefault(version.name, deque())
            while times and now - times[0] > s.restart_window_s:
                times.popleft()
            if len(times) >= s.restarts_allowed:
                log.error("the engine of %s died %d times in %.0f s; stopping the service",
                          version.name, len(times) + 1, s.restart_window_s)
                return 1
            times.append(now)
            log.error("the engine of %s died (exit code %s); restarting it", version.name,
                      proc.exitcode)
            self.reloader.restart(version)
        for i, proc in enumerate(self.workers):
            if not proc.is_alive() and not self.stopping:
                if proc.pid is not None:
                    multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
                times = self.worker_restarts
                while times and now - times[0] > s.restart_window_s:
                    times.popleft()
                if len(times) >= s.restarts_allowed:
                    log.error("HTTP workers died %d times in %.0f s; stopping the service",
                              len(times) + 1, s.restart_window_s)
                    return 1
                times.append(now)
                log.error("an HTTP worker died (exit code %s); restarting it", proc.exitcode)
                self.workers[i] = self.start_worker()
        return 0

    @staticmethod
    def reap_orphans() -> None:
        # Our own children are left to multiprocessing (is_alive() and exitcode wait for
        # them); active_children() waits for those that exited, so they are not in the way.
        own = {p.pid for p in multiprocessing.active_children() if p.pid is not None}
        for pid in reap_orphans(own):
            log.debug("reaped orphaned process %d", pid)

    def hung(self, version: Version) -> bool:
        """Alive but silent: no heartbeat for CHARLSTM_ENGINE_HUNG_S, or still not up long
        after it was started."""
        try:
            silent = time.time() - alive_file(version.address).stat().st_mtime
        except FileNotFoundError:
            return time.monotonic() - version.started_at > self.settings.engine_start_timeout_s
        return silent > self.settings.engine_hung_s

    def on_reload_signal(self, sig: int, frame: FrameType | None) -> None:
        log.info("SIGHUP: looking for new and changed model folders in %s",
                 self.settings.models_dir)
        self.reloader.wanted.set()

    def on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("signal %s: draining the HTTP workers for up to %.0f s",
                     signal.Signals(sig).name, self.settings.drain_s)
            self.stopping = True
        else:
            log.info("second signal: stopping now")
            for proc in [*self.workers, *self.reloader.all_processes()]:
                if proc.is_alive() and proc.pid is not None:
                    os.kill(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Workers first (they drain and answer 503 meanwhile), then the engines."""
        self.stopping = True
        if self.watcher is not None:
            self.watcher.stop()
        self._stop(self.workers, self.settings.drain_s + 15)
        self._stop(self.reloader.all_processes(), 10)
        if self.sock is not None:
            self.sock.close()
        if self.control is not None:
            self.control.close()
        self.zmq.term()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    @staticmethod
    def _stop(procs: Sequence[EngineProcess], timeout_s: float) -> None:
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
    try:
        settings = Settings()
    except ValidationError as exc:
        for err in exc.errors(include_input=False):
            where = "CHARLSTM_" + "_".join(str(p) for p in err["loc"][:1]).upper()
            print(f"error: cannot start: {where}: {err['msg']}", file=sys.stderr)
        return 2
    from app.tracing import environment_problem

    problem = environment_problem()
    if problem is not None:
        print(f"error: cannot start: {problem}", file=sys.stderr)
        return 2
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
    signal.signal(signal.SIGHUP, sup.on_reload_signal)
    return sup.run()
