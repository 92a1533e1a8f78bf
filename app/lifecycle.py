"""What the supervisor and its child processes agree on about staying alive."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Collection
from pathlib import Path


def die_with_parent(expected_parent_pid: int | None = None) -> None:
    """In an engine or worker process: get SIGTERM when the supervisor dies, however it dies
    (SIGKILL included), so nothing keeps serving unwatched: Linux's PR_SET_PDEATHSIG (the
    service runs on Linux; elsewhere this does nothing).

    expected_parent_pid: the supervisor's pid; by default the parent multiprocessing names
    (the process that started this one). If the parent is already another process, the
    supervisor died before prctl took effect. Comparing with 1 instead would be wrong where
    the supervisor is itself PID 1 (a container without an init, `unshare --pid`), and where
    an orphan goes to a subreaper rather than to PID 1."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if expected_parent_pid is None:
        parent = multiprocessing.parent_process()
        expected_parent_pid = parent.pid if parent is not None else None
    if expected_parent_pid is not None and os.getppid() != expected_parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def reap_orphans(own_children: Collection[int]) -> list[int]:
    """As PID 1 (a container without an init): reap exited processes that are not among
    `own_children`, and return their pids. Orphaned grandchildren are handed to PID 1, and
    nobody else will ever wait for them; the supervisor's own children are left to
    multiprocessing, which waits for them itself (Process.exitcode needs that wait).

    Peeks first (WNOWAIT) so that one of `own_children` is never reaped here: when the
    next exited process is one of them, this stops and leaves it for multiprocessing
    (the next call goes on past it once it is waited for)."""
    reaped: list[int] = []
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # no children at all
            return reaped
        if info is None or info.si_pid in own_children:
            return reaped
        try:
            os.waitpid(info.si_pid, 0)
        except ChildProcessError:  # waited for meanwhile (another thread)
            continue
        reaped.append(info.si_pid)


def alive_file(address: str) -> Path:
    """The file an engine touches at every heartbeat, beside its socket."""
    return Path(address.removeprefix("ipc://") + ".alive")
