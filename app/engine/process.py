"""An engine process: one model's EngineLoop (app/engine/loop.py) on an `ipc://` socket,
started by the supervisor (app/supervisor.py) for `python -m app`."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

import zmq

from app.artifact import ArtifactError
from app.decode import load_served
from app.engine.core import EngineCore
from app.engine.loop import EngineLoop, router_socket
from app.lifecycle import alive_file, die_with_parent
from app.metrics import Metrics
from app.settings import Settings

log = logging.getLogger(__name__)

def main(model_dir: Path, address: str, settings: Settings,
         reason_file: Path | None = None) -> None:
    """Entry point of the engine process for one model (started by app.supervisor).
    reason_file: where to write why the model cannot be loaded (else stderr)."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop_ref: list[EngineLoop] = []
    retire_asked: list[bool] = []

    def stop(sig: int, frame: FrameType | None) -> None:
        if not loop_ref:  # still loading the model: nothing to finish
            raise SystemExit(0)
        for loop in loop_ref:
            loop.stopping = True

    def retire(sig: int, frame: FrameType | None) -> None:
        retire_asked.append(True)
        for loop in loop_ref:
            loop.retire(settings.drain_s)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, retire)
    die_with_parent()
    # Ctrl-C and a terminal's hangup reach the whole process group: the supervisor decides
    # when engines stop, and what a SIGHUP means (a reload).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        model, decode = load_served(model_dir, settings)
    except ArtifactError as exc:
        # The supervisor sees the exit code and stops start-up (or refuses a reload); this
        # is the reason.
        if reason_file is not None:
            reason_file.write_text(str(exc), encoding="utf-8")
        else:
            print(f"error: cannot start: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    observer = Metrics().observer(model.name)
    core = EngineCore(model, observer=observer, decode=decode, **settings.engine_limits())
    core.policy.calibrate()
    ctx = zmq.Context()
    sock = router_socket(ctx, address)
    loop = EngineLoop(core, sock, model.provider, model.graph_file, settings.loop_timings())
    loop.alive_file = alive_file(address)
    loop_ref.append(loop)
    if retire_asked:
        loop.retire(settings.drain_s)
    log.info("engine for %s ready on %s (pid %d, %s)", model.name, address, os.getpid(),
             core.graph_files)
    try:
        loop.run()
    finally:
        sock.close()
        ctx.term()
