"""What the supervisor and its child processes agree on about staying alive."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def die_with_parent() -> None:
    """In an engine or worker process: get SIGTERM when the supervisor dies, however it dies
    (SIGKILL included), so nothing keeps serving unwatched: Linux's PR_SET_PDEATHSIG (the
    service runs on Linux; elsewhere this does nothing)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def alive_file(address: str) -> Path:
    """The file an engine touches at every heartbeat, beside its socket."""
    return Path(address.removeprefix("ipc://") + ".alive")
