"""Drives an EngineCore on a worker thread inside the service's process.

The event loop never touches the core: submissions and cancellations go through an inbox
the worker drains at the top of each iteration (where admission is decided against the
core's exact state), and results come back through per-request asyncio events, set at
most once per step, so a slow reader never slows the batch; it finds several characters
waiting.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from app.decode import DecodeGraphs
from app.engine.core import (
    EngineCore,
    EngineObserver,
    GenerationParams,
    QueueFullError,
    Sequence,
    StepModel,
)

log = logging.getLogger(__name__)


class EngineClosedError(Exception):
    """The engine no longer admits requests (draining, stopped or dead)."""


class Request(Sequence):
    """A sequence plus what its reader on the event loop needs (any engine driver)."""

    def __init__(self, params: GenerationParams, on_cancel: Callable[[Request], None]) -> None:
        super().__init__(params)
        self.updated = asyncio.Event()
        self.refusal: QueueFullError | None = None
        self.decided = False  # admission decided (accepted, or refused with `refusal`)
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next iteration (safe from any thread)."""
        if not self.cancelled:
            self.cancelled = True
            self._on_cancel(self)

    async def wait(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait for news (admission, new ids or the finish); False on timeout."""
        if not self.updated.is_set():
            try:
                # asyncio.timeout, not wait_for: no extra Task per wake-up on the hot path.
                async with asyncio.timeout(timeout):
                    await self.updated.wait()
            except TimeoutError:
                return False
        self.updated.clear()
        return True


class Engine:
    """Continuous batching for one model on one worker thread."""

    def __init__(self, model: StepModel, max_batch: int = 256, max_queue: int = 256,
                 max_wait_s: float = 10.0, observer: EngineObserver | None = None,
                 prefill_chunk_chars: int = 256, state_cache_bytes: int = 0,
                 decode: DecodeGraphs | None = None) -> None:
        self.model = model
        self.core = EngineCore(model, max_batch=max_batch, max_queue=max_queue,
                               prefill_chunk_chars=prefill_chunk_chars, max_wait_s=max_wait_s,
                               observer=observer, state_cache_bytes=state_cache_bytes,
                               decode=decode)
        self._inbox: deque[Request] = deque()  # deque append/popleft are thread-safe
        self._cv = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._abort: str | None = None  # set by abort(): end everything with this error
        self._dead = False
        self._cancel_seen = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Loop wake-ups: requests touched since the last flush, and whether one is scheduled.
        self._dirty: set[Request] = set()
        self._dirty_lock = threading.Lock()
        self._flush_scheduled = False
        self._last_wake = 0.0
        self._streams: set[int] = set()  # ids of streaming requests: the wake interval grows
        # Published by the worker after each iteration for /metrics and /models.
        self.waiting = 0
        self.active = 0
        self.predicted_wait_s = 0.0
        self._predicted_at = 0.0

    # --- event-loop side ----------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    @property
    def alive(self) -> bool:
        """False once the worker has died: the service must stop looking ready."""
        return not self._dead and (self._thread is None or self._thread.is_alive())

    @property
    def chars_per_s(self) -> float:
        return self.core.chars_per_s

    @property
    def provider(self) -> str:
        return str(getattr(self.model, "provider", "CPUExecutionProvider"))

    @property
    def graph(self) -> str:
        return str(getattr(self.model, "graph_file", "model.onnx"))

    @property
    def decode_graph(self) -> str | None:
        return self.core.decode.files if self.core.decode else None

    def refresh_metrics(self) -> None:
        """Gauges that change between engine events (the process engine publishes its own)."""
        observer = self.core.observer
        if observer is not None:
            observer.on_queue(self.waiting, self.active)
            observer.on_estimate(self.predicted_wait_s, self.chars_per_s)

    def start(self) -> None:
        """Start the worker; call from the event loop that will read the results."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.model.name}",
                                        daemon=True)
        self._thread.start()

    async def submit(self, params: GenerationParams) -> Request:
        """Queue a request, or raise QueueFullError (429) / EngineClosedError (503)."""
        if not self.accepting:
            raise EngineClosedError(f"model {self.model.name!r} is not accepting requests")
        req = Request(params, lambda _: self._notify_cancel())
        self._inbox.append(req)
        with self._cv:
            self._cv.notify()
        try:
            while not req.decided:
                if not await req.wait(1.0) and not self.alive:
                    raise EngineClosedError(f"the engine of model {self.model.name!r} stopped")
        except BaseException:
            req.cancel()  # the caller went away while waiting for admission
            raise
        if req.refusal is not None:
            raise req.refusal
        return req

    def stop_admitting(self) -> None:
        self._accepting = False

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting and wait up to grace_s for queued and running requests to end;
        past that, end the rest with an error so every reader gets a final answer."""
        self.stop_admitting()
        deadline = time.perf_counter() + grace_s
        # Polling keeps the worker free of loop callbacks; 50 ms is nothing next to a drain.
        while self._busy() and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if not self._busy():
            return True
        self.abort(f"the server shut down before this generation finished (drain time of "
                   f"{grace_s:g} s ran out)")
        while self._busy() and self.alive:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return False

    def _busy(self) -> bool:
        return bool(self._inbox) or self.core.has_work

    def abort(self, error: str) -> None:
        """End every request at the next iteration with finish_reason 'error'."""
        with self._cv:
            self._abort = error
            self._cv.notify()

    def close(self) -> None:
        """Stop the worker; anything still running finishes as cancelled."""
        self._accepting = False
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _notify_cancel(self) -> None:
        self._cancel_seen = True
        with self._cv:
            self._cv.notify()

    # --- worker side ----------------------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        try:
            try:
                core.calibrate()
            except Exception:  # the loader's warm-up passed; predictions keep their defaults
                log.exception("could not time the graph of %s for wait predictions",
                              self.model.name)
            while True:
                with self._cv:
                    while not (self._stopping or self._inbox or core.has_work
                               or self._abort):
                        self._wake(force=True)  # deliver what is pending before idling
                        self._cv.wait(timeout=1.0)
                    if self._stopping:
                        break
                try:
                    self._iteration()
                except Exception:
                    core.recover()
                    self._publish()
                    self._collect()
                    self._wake(force=True)
        finally:
            if not self._stopping:
                log.error("engine worker for %s died; the model is unavailable",
                          self.model.name)
            self._dead = True
            for r in list(self._inbox):
                r.decided = True
                r.refusal = None
                core.submit(r)
            self._inbox.clear()
            core.abort_all("cancelled" if self._stopping else "error",
                           None if self._stopping else "the model's engine stopped")
            self._collect()
            self._wake(force=True)

    def _iteration(self) -> None:
        core = self.core
        if self._cancel_seen:  # before decisions: a row just cancelled is a free row
            self._cancel_seen = False
            core.cancel_flagged()
        # At most a batch's worth of decisions per iteration: a burst is then judged on
        # iteration times measured under it, not all at once on the calibration's, and the
        # rows already running wait for a bounded amount of admission work.
        for _ in range(min(len(self._inbox), core.max_batch)):
            self._decide(self._inbox.popleft())
        if self._abort is not None:
            core.abort_all("error", self._abort)
            self._abort = None
        if self._cancel_seen:
            self._cancel_seen = False
            core.cancel_flagged()
        if core.has_work:
            core.iterate()
        self._publish()  # before the wake-up: a reader that sees its finish sees the counts
        self._collect()
        self._wake()

    def _decide(self, req: Request) -> None:
        core = self.core
        if req.cancelled:
            req.decided = True
            core.submit(req)  # queued then dropped by cancel_flagged: finish "cancelled"
            self._cancel_seen = True
        else:
            _, refusal, retry = core.admission(req.params)
            if refusal is not None:
                req.refusal = QueueFullError(self.model.name, refusal, retry)
            else:
                core.submit(req)
                if req.params.stream:
                    self._streams.add(req.id)
            req.decided = True
        with self._dirty_lock:
            self._dirty.add(req)

    def _collect(self) -> None:
        touched = self.core.touched
        if not touched:
            return
        self.core.touched = []
        with self._dirty_lock:
            for s in touched:
                if s.params.stream or s.done:
                    self._dirty.add(s)  # type: ignore[arg-type]  # the driver's Requests
                if s.done and s.params.stream:
                    self._streams.discard(s.id)

    PREDICTION_INTERVAL_S = 0.05  # the simulation is O(rows + queue): not on every step

    def _publish(self) -> None:
        core = self.core
        self.waiting = len(core.waiting)
        self.active = core.active
        now = time.perf_counter()
        if not (self.waiting or self.active):
            self.predicted_wait_s = 0.0
        elif now - self._predicted_at >= self.PREDICTION_INTERVAL_S:
            self.predicted_wait_s = core.predict_wait()
            self._predicted_at = now

    # Each wake-up costs the event loop ~tens of µs per stream woken (format and write one
    # SSE event), and the loop shares the GIL with this worker. Waking at most every
    # 250 µs x streams (capped at 20 ms) keeps that cost a bounded share of the time: one
    # character per event for a few streams, several per event when many are running.
    WAKE_S_PER_STREAM = 250e-6
    MAX_WAKE_INTERVAL_S = 0.02

    def _wake(self, force: bool = False) -> None:
        """Schedule one flush on the loop unless one is pending or the last was too recent."""
        now = time.perf_counter()
        interval = min(self.MAX_WAKE_INTERVAL_S, self.WAKE_S_PER_STREAM * len(self._streams))
        if not force and now - self._last_wake < interval:
            return
        with self._dirty_lock:
            if self._flush_scheduled or not self._dirty or self._loop is None:
                return
            self._flush_scheduled = True
        self._last_wake = now
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # loop closed (shutdown); nobody is listening any more
            with self._dirty_lock:
                self._dirty.clear()
                self._flush_scheduled = False

    def _flush(self) -> None:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
            self._flush_scheduled = False
        for r in dirty:
            r.updated.set()


