"""The HTTP worker's side of an engine process: submit, cancel, and read results.

One DEALER socket per model per worker. A task reads the engine's messages and hands each
request its new ids; another sends a heartbeat and judges the engine alive by its `Status`
heartbeats. An engine whose process is gone (GONE_AFTER_S of silence) or that stays silent
for HUNG_AFTER_S with nothing waiting to be read is dead: every request in flight ends with
an error at once, new ones get 503, and /ready turns false until its heartbeat comes back (the
supervisor restarts it). Silence alone is not enough under load: this worker's own event
loop may be the one that is late, with the engine's messages queued unread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from app.continuation import states_from_bytes, states_to_bytes
from app.engine.core import GenerationParams, QueueFullError, TokenDetail
from app.engine.local import EngineClosedError, Request
from app.engine.messages import (
    Abort,
    Admission,
    Cancel,
    Hello,
    Outputs,
    Status,
    Submit,
    encoder,
    from_engine,
)

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.1
# Silent this long and its process no longer exists (or is a zombie): dead.
GONE_AFTER_S = 0.3
# Silent this long, alive, nothing unread: hung (stopped, deadlocked). Longer than any single
# engine iteration (a prefill slice, a step at full batch) takes on a loaded CPU, short
# enough that requests fail well before a client gives up; the supervisor kills it later.
HUNG_AFTER_S = 1.0
# An admission decision takes one engine iteration; this long without one is a lost message.
ADMISSION_TIMEOUT_S = 30.0


def engine_address(engine_dir: Path, model: str) -> str:
    """The ZeroMQ endpoint of a model's engine process: a Unix socket in the run folder."""
    return f"ipc://{engine_dir / (model + '.sock')}"


class RemoteEngine:
    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self._reqs: dict[int, Request] = {}
        self._rids = itertools.count(1)
        self._accepting = True
        self._status: Status | None = None
        self._heard_at = 0.0
        self._alive = False
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # --- state seen by the service --------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def accepting(self) -> bool:
        return self._accepting and self._alive

    @property
    def waiting(self) -> int:
        return self._status.waiting if self._status else 0

    @property
    def active(self) -> int:
        return self._status.active if self._status else 0

    @property
    def predicted_wait_s(self) -> float:
        return self._status.predicted_wait_s if self._status else 0.0

    @property
    def chars_per_s(self) -> float:
        return self._status.chars_per_s if self._status else 0.0

    @property
    def provider(self) -> str:
        return self._status.provider if self._status else "unknown"

    @property
    def graph(self) -> str:
        return self._status.graph if self._status else "unknown"

    @property
    def decode_graph(self) -> str | None:
        return (self._status.decode_graph or None) if self._status else None

    @property
    def pid(self) -> int | None:
        return self._status.pid if self._status else None

    def refresh_metrics(self) -> None:
        """The engine process writes its own gauges (prometheus multiprocess files)."""

    # --- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"{os.getpid()}-{uuid.uuid4().hex[:8]}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(self.address)
        self._sock = sock
        self._tasks = [asyncio.ensure_future(self._receive()),
                       asyncio.ensure_future(self._heartbeat())]

    async def wait_alive(self, timeout_s: float) -> bool:
        deadline = time.perf_counter() + timeout_s
        while not self._alive and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return self._alive

    def close(self) -> None:
        self._accepting = False
        for t in self._tasks:
            t.cancel()
        self._fail_all("the server is shutting down", reason="cancelled")
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # --- requests -------------------------------------------------------------------------
    async def submit(self, params: GenerationParams) -> Request:
        if not self.accepting:
            raise EngineClosedError(f"model {self.name!r} is not accepting requests"
                                    if self._alive else
                                    f"the engine of model {self.name!r} is not running")
        rid = next(self._rids)
        req = Request(params, lambda r: self._send(Cancel(rid)))
        self._reqs[rid] = req
        self._send(Submit(
            rid=rid, seed_ids=params.seed_ids.tolist(), max_new=params.max_new,
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
            seed=params.seed, stop=[list(s) for s in params.stop],
            time_limit_s=params.time_limit_s, details=params.details, stream=params.stream,
            submitted_at=req.submitted_at,
            initial_states=None if params.initial_states is None else states_to_bytes(
                params.initial_states),
            counter_start=params.counter_start, resumable=params.resumable,
            cache_scope=params.cache_scope))
        deadline = time.perf_counter() + ADMISSION_TIMEOUT_S
        try:
            while not req.decided:
                await req.wait(1.0)
                if not req.decided and (not self._alive or time.perf_counter() > deadline):
                    raise EngineClosedError(f"the engine of model {self.name!r} stopped"
                                            if not self._alive else
                                            f"the engine of model {self.name!r} did not "
                                            "answer in time")
        except BaseException:
            req.cancel()
            self._reqs.pop(rid, None)
            raise
        if req.refusal is not None:
            self._reqs.pop(rid, None)
            raise req.refusal
        if req.done and req.admitted_at is None and not self._alive:
            raise EngineClosedError(f"the engine of model {self.name!r} stopped")
        return req

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting; give this worker's requests grace_s, then end them with an error."""
        self._accepting = False
        deadline = time.perf_counter() + grace_s
        while self._reqs and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if not self._reqs:
            return True
        error = (f"the server shut down before this generation finished (drain time of "
                 f"{grace_s:g} s ran out)")
        self._send(Abort(error))
        deadline = time.perf_counter() + 2.0
        while self._reqs and self._alive and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self._fail_all(error)  # whatever the engine did not end in time
        return False

    # --- wire -----------------------------------------------------------------------------
    def _send(self, msg: msgspec.Struct) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send(encoder.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("could not send to the engine of %s: %s", self.name, exc)

    async def _receive(self) -> None:
        assert self._sock is not None
        while True:
            payload = await self._sock.recv()
            try:
                msg = from_engine.decode(payload)
            except msgspec.DecodeError:
                log.error("dropped a malformed message from the engine of %s", self.name)
                continue
            self._heard_at = time.perf_counter()
            if isinstance(msg, Outputs):
                self._deliver(msg)
            elif isinstance(msg, Admission):
                req = self._reqs.get(msg.rid)
                if req is not None:
                    if msg.refusal is not None:
                        req.refusal = QueueFullError(self.name, msg.refusal, msg.retry_after)
                    req.decided = True
                    req.updated.set()
            elif isinstance(msg, Status):
                if self._status is not None and msg.pid != self._status.pid:
                    # Restarted before it was found dead: the new engine has never heard of
                    # the requests in flight, which would otherwise wait forever.
                    log.error("the engine of %s restarted (pid %d -> %d); failing %d "
                              "request(s) in flight", self.name, self._status.pid, msg.pid,
                              len(self._reqs))
                    self._fail_all(f"the engine of model {self.name!r} stopped")
                if not self._alive:
                    log.info("engine of %s is up (pid %d)", self.name, msg.pid)
                self._status = msg
                self._alive = True

    def _deliver(self, msg: Outputs) -> None:
        for d in msg.deltas:
            req = self._reqs.get(d.rid)
            if req is None:
                continue
            if d.ids:
                req.ids.extend(d.ids)
            if d.details:
                req.details.extend(TokenDetail(p, [(int(i), float(q)) for i, q in top])
                                   for p, top in d.details)
            if d.finish is not None:
                f = d.finish
                req.sampled, req.error = f.sampled, f.error
                req.admitted_at, req.first_at = f.admitted_at, f.first_at
                req.prefill_s, req.finished_at = f.prefill_s, f.finished_at
                if f.final_states is not None:
                    req.final = (states_from_bytes(f.final_states), f.final_id, f.final_counter)
                req.finish_reason = f.reason  # last: readers that see it see the rest
                del self._reqs[d.rid]
            req.updated.set()

    async def _heartbeat(self) -> None:
        hello = Hello(os.getpid())
        while True:
            self._send(hello)
            await asyncio.sleep(HEARTBEAT_S)
            if not self._alive:
                continue
            silent = time.perf_counter() - self._heard_at
            if silent <= GONE_AFTER_S or self._unread():
                continue
            pid = self._status.pid if self._status is not None else None
            if pid is not None and process_gone(pid):
                what = "exited"
            elif silent > HUNG_AFTER_S:
                what = "stopped answering"
            else:
                continue
            self._alive = False
            log.error("the engine of %s %s; failing %d request(s) in flight", self.name,
                      what, len(self._reqs))
            if what != "exited":
                # If it was only stalled, it must not go on generating for nobody: the
                # cancels wait in the socket until it reads again.
                for rid in list(self._reqs):
                    self._send(Cancel(rid))
            self._fail_all(f"the engine of model {self.name!r} stopped")

    def _unread(self) -> bool:
        """Messages from the engine wait in the socket: it spoke, this loop was late."""
        if self._sock is None:
            return False
        try:
            events = self._sock.getsockopt(zmq.EVENTS)
            return isinstance(events, int) and bool(events & zmq.POLLIN)
        except zmq.ZMQError:
            return False

    def _fail_all(self, error: str, reason: str = "error") -> None:
        reqs, self._reqs = self._reqs, {}
        now = time.perf_counter()
        for req in reqs.values():
            if not req.decided:
                req.decided = True
                req.refusal = None
            req.error = error if reason == "error" else None
            req.finished_at = now
            req.finish_reason = reason
            req.updated.set()


def process_gone(pid: int) -> bool:
    """The process no longer runs: absent, or a zombie its parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    except OSError:  # no /proc here: ask the kernel the portable way
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return state in (b"Z", b"X")
