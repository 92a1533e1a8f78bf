"""The HTTP side of an engine: submit a `GenerationRequest`, read its events, cancel it.

One client class for both layouts, chosen at start-up by `make_client`:
- `python -m app`: the engine runs in its own process (app/engine/process.py) and the client
  connects to its `ipc://` socket;
- `uvicorn app.main:app`: `start_thread_engine` runs the same engine loop on a thread of this
  process, on an `inproc://` socket.

The service (app/service.py) never asks which one it has.

Alive, slow or dead: an engine whose process (or thread) is gone is dead at once (every request
in flight ends with an error, new ones get 503, /ready turns false until its heartbeat comes
back: the supervisor restarts it). One that is merely silent is slow, not dead: a CPU quota, a
swap storm or a stop signal pauses it, and its requests carry on when it comes back. Only a
silence longer than CHARLSTM_ENGINE_HUNG_S (when the supervisor kills it anyway) plus a margin
gives up on it from here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from app.engine.core import EngineCore
from app.engine.loop import EngineLoop, LoopTimings, router_socket
from app.engine.messages import (
    Abort,
    Admitted,
    Cancel,
    Chars,
    Event,
    Finished,
    GenerationRequest,
    Hello,
    Outputs,
    Refused,
    Started,
    Status,
    encoder,
    from_engine,
)

log = logging.getLogger(__name__)


class EngineUnavailableError(Exception):
    """The engine does not take requests (draining, stopped, dead, or not answering)."""


class RefusedError(Exception):
    """The engine refused the request (`kind`: overloaded, unavailable or invalid)."""

    def __init__(self, kind: str, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.kind, self.message, self.retry_after = kind, message, retry_after


@dataclass(frozen=True)
class ClientTimings:
    heartbeat_s: float = 0.1
    # Silent this long and its process (thread) no longer exists: dead.
    gone_after_s: float = 0.3
    # Silent this long, alive, nothing unread: given up on (the supervisor's watchdog kills a
    # hung engine at CHARLSTM_ENGINE_HUNG_S; this is the backstop past it).
    hung_after_s: float = 15.0
    # An admission decision takes one engine iteration; this long without one is a lost
    # message (a stalled engine pauses this clock: see _admission).
    admission_timeout_s: float = 30.0


def engine_address(engine_dir: Path, model: str) -> str:
    """The ZeroMQ endpoint of a model's engine process: a Unix socket in the run folder."""
    return f"ipc://{engine_dir / (model + '.sock')}"


class _Stream:
    """One request's events as they arrive, for its one reader.

    The reader waits on a bare future per wait; its idle timeout is one timer per stream that
    is re-armed only when it fires early (a stream that gets events often never pays for a
    timer per event, as asyncio.timeout or wait_for would)."""

    def __init__(self, req: GenerationRequest) -> None:
        self.req = req
        self.events: list[Event] = []
        self.decided = False
        self.started: Started | None = None
        self.delivered = 0  # ids delivered so far
        self.finished: set[int] = set()  # choices that have finished
        self.prefill_s = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0  # loop time at which the pending take gives up

    def put(self, event: Event) -> None:
        if isinstance(event, Admitted | Refused):
            self.decided = True
        elif isinstance(event, Chars):
            self.delivered += len(event.ids)
            if event.started is not None:
                self.started = event.started
        elif isinstance(event, Finished):
            self.finished.add(event.index)
        self.events.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:  # noqa: ASYNC109
        """Until an event is here, or `timeout` seconds (None: no limit)."""
        if self.events:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        if timeout is not None:
            self._due = loop.time() + timeout
            # A timer armed for later (a longer earlier wait) would fire late: move it.
            if self._timer is not None and self._timer.when() > self._due:
                self._timer.cancel()
                self._timer = None
            if self._timer is None:
                self._timer = loop.call_at(self._due, self._expire)
        try:
            await waiter
        finally:
            self._waiter = None

    async def take(self, timeout: float | None) -> list[Event]:  # noqa: ASYNC109
        """The events since the last take; [] after `timeout` seconds without any."""
        await self.wait(timeout)
        events, self.events = self.events, []
        return events

    def _expire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next take arms the timer again
        loop = waiter.get_loop()
        if loop.time() + 1e-3 >= self._due:
            waiter.set_result(None)  # no events: the take returns []
        else:  # armed by an earlier take that was answered in time
            self._timer = loop.call_at(self._due, self._expire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class EngineClient:
    def __init__(self, name: str, address: str, timings: ClientTimings | None = None,
                 gone: Callable[[int | None], bool] | None = None) -> None:
        """gone(pid): True when the engine (process pid, or thread) no longer runs."""
        self.name = name
        self.address = address
        self.t = timings or ClientTimings()
        self._gone = gone or process_gone
        self._streams: dict[int, _Stream] = {}
        self._rids = itertools.count(1)
        self._accepting = True
        self._status: Status | None = None
        self._heard_at = 0.0
        self._alive = False
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.thread: ThreadEngine | None = None  # the in-process layout's engine, if any

    # --- state seen by the service --------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def accepting(self) -> bool:
        return self._accepting and self._alive

    @property
    def status(self) -> Status | None:
        return self._status

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
    def in_flight(self) -> int:
        return len(self._streams)

    # --- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
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
        if self.thread is not None:
            self.thread.stop()

    # --- requests -------------------------------------------------------------------------
    async def generate(self, req: GenerationRequest, idle_s: float | None = None
                       ) -> AsyncGenerator[Event | None, None]:
        """Submit `req`; yield `Admitted` (or raise RefusedError / EngineUnavailableError),
        then its `Scored` (with `score`), its `Chars` and its `Finished` last (one per choice
        with n > 1, `Chars` and `Finished` carrying the choice's index), merging what arrived
        meanwhile into one `Chars` per choice; None after `idle_s` seconds without news.
        Leaving early cancels it."""
        if not self.accepting:
            raise EngineUnavailableError(
                f"model {self.name!r} is not accepting requests" if self._alive else
                f"the engine of model {self.name!r} is not running")
        req.rid = next(self._rids)
        req.submitted_at = req.submitted_at or time.perf_counter()
        try:
            payload = encoder.encode(req)
        except (OverflowError, TypeError, ValueError) as exc:  # a number msgpack cannot hold
            raise RefusedError("invalid", f"invalid generation parameters: {exc}", 0) from None
        stream = self._streams[req.rid] = _Stream(req)
        finishes = 0
        try:
            self._send_bytes(payload)
            yield await self._admission(stream)
            while finishes < req.n:
                events = await stream.take(idle_s)
                if not events:
                    yield None
                    continue
                for event in merge_chars(events):
                    finishes += isinstance(event, Finished)
                    yield event
        finally:
            stream.close()
            self._streams.pop(req.rid, None)
            if finishes < req.n:
                self._send(Cancel(req.rid))

    async def _admission(self, stream: _Stream) -> Admitted:
        waited = 0.0
        while not stream.decided:
            t0 = time.perf_counter()
            await stream.wait(1.0)
            # A stalled engine (alive, silent) pauses the clock: it will answer when it runs.
            if time.perf_counter() - self._heard_at < 1.0:
                waited += time.perf_counter() - t0
            if stream.decided:
                break
            if not self._alive:
                raise EngineUnavailableError(f"the engine of model {self.name!r} stopped")
            if waited > self.t.admission_timeout_s:
                raise EngineUnavailableError(f"the engine of model {self.name!r} did not "
                                             "answer in time")
        first = stream.events.pop(0)
        if isinstance(first, Refused):
            raise RefusedError(first.kind, first.message, first.retry_after)
        assert isinstance(first, Admitted)
        return first

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting; give this client's requests grace_s, then end them with an error."""
        self._accepting = False
        deadline = time.perf_counter() + grace_s
        while self._streams and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if not self._streams:
            return True
        error = (f"the server shut down before this generation finished (drain time of "
                 f"{grace_s:g} s ran out)")
        self._send(Abort(error))
        deadline = time.perf_counter() + 2.0
        while self._streams and self._alive and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self._fail_all(error)  # whatever the engine did not end in time
        return False

    # --- wire -----------------------------------------------------------------------------
    def _send(self, msg: msgspec.Struct) -> None:
        self._send_bytes(encoder.encode(msg))

    def _send_bytes(self, payload: bytes) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send(payload, zmq.NOBLOCK)
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
                for event in msg.events:
                    stream = self._streams.get(event.rid)
                    if stream is not None:
                        stream.put(event)
            elif isinstance(msg, Status):
                if self._status is not None and msg.pid != self._status.pid:
                    # Restarted before it was found dead: the new engine has never heard of
                    # the requests in flight, which would otherwise wait forever.
                    log.error("the engine of %s restarted (pid %d -> %d); failing %d "
                              "request(s) in flight", self.name, self._status.pid, msg.pid,
                              len(self._streams))
                    self._fail_all(f"the engine of model {self.name!r} stopped")
                if not self._alive:
                    log.info("engine of %s is up (pid %d)", self.name, msg.pid)
                self._status = msg
                self._alive = True

    async def _heartbeat(self) -> None:
        hello = Hello(os.getpid())
        while True:
            self._send(hello)
            await asyncio.sleep(self.t.heartbeat_s)
            if not self._alive:
                continue
            silent = time.perf_counter() - self._heard_at
            if silent <= self.t.gone_after_s or self._unread():
                continue
            pid = self._status.pid if self._status is not None else None
            if self._gone(pid):
                what = "exited"
            elif silent > self.t.hung_after_s:
                what = "stopped answering"
            else:
                continue  # slow, not dead: its requests wait for it
            self._alive = False
            log.error("the engine of %s %s; failing %d request(s) in flight", self.name,
                      what, len(self._streams))
            if what != "exited":
                # If it was only stalled, it must not go on generating for nobody: the
                # cancels wait in the socket until it reads again.
                for rid in list(self._streams):
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
        """End every request in flight here, with the timings the engine had sent."""
        streams, self._streams = self._streams, {}
        now = time.perf_counter()
        for s in streams.values():
            if not s.decided:
                s.put(Refused(s.req.rid, "unavailable", error))
                continue
            started = s.started
            for index in sorted(set(range(s.req.n)) - s.finished):
                s.put(Finished(s.req.rid, reason, error if reason == "error" else None,
                               s.delivered, s.req.submitted_at, started, now,
                               started.prefill_s if started else 0.0, index=index))


def merge_chars(events: list[Event]) -> list[Event]:
    """Consecutive `Chars` of one request's choice as one (a reader that fell behind gets
    them in one piece, not one per engine flush)."""
    out: list[Event] = []
    for e in events:
        last = out[-1] if out else None
        if isinstance(e, Chars) and isinstance(last, Chars) and e.index == last.index:
            details = (None if last.details is None or e.details is None
                       else [*last.details, *e.details])
            out[-1] = Chars(e.rid, [*last.ids, *e.ids], details, last.started or e.started,
                            e.index)
        else:
            out.append(e)
    return out


def process_gone(pid: int | None) -> bool:
    """The process no longer runs: absent, or a zombie its parent has not reaped yet."""
    if pid is None:
        return False
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


# --- the in-process layout ----------------------------------------------------------------

class ThreadEngine:
    """An engine loop on a daemon thread of this process, serving one `inproc://` socket."""

    def __init__(self, core: EngineCore, provider: str, graph: str,
                 timings: LoopTimings) -> None:
        self.core = core
        self.address = f"inproc://engine-{core.model.name}-{uuid.uuid4().hex[:8]}"
        # inproc needs the clients' context: the asyncio one, shared (its sockets are
        # plain ZeroMQ sockets underneath).
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(
            zmq.asyncio.Context.instance().underlying)
        self.sock = router_socket(self.ctx, self.address)
        self.loop = EngineLoop(core, self.sock, provider, graph, timings)
        self.thread = threading.Thread(target=self._run, name=f"engine-{core.model.name}",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            try:
                self.core.policy.calibrate()
            except Exception:  # the loader's warm-up passed; predictions keep their defaults
                log.exception("could not time the graph of %s for wait predictions",
                              self.core.model.name)
            self.loop.run()
        except BaseException:
            log.exception("engine thread for %s died; the model is unavailable",
                          self.core.model.name)
            raise
        finally:
            self.sock.close()

    def gone(self, pid: int | None) -> bool:
        return not self.thread.is_alive()

    def stop(self) -> None:
        self.loop.stopping = True
        self.thread.join(timeout=10)


def make_client(name: str, address: str, timings: ClientTimings,
                thread: ThreadEngine | None = None) -> EngineClient:
    """The engine client for a model: of an engine process at `address`, or of the engine
    loop on `thread` (which it starts)."""
    if thread is None:
        return EngineClient(name, address, timings)
    thread.start()
    client = EngineClient(name, thread.address, timings, gone=thread.gone)
    client.thread = thread
    return client
