"""Continuous-batching decode engine for one model. Knows ids and arrays, not HTTP or text.

Life of the batch (one worker thread per model, so onnxruntime never blocks the event loop):

    admit   waiting requests join, their seeds run through the graph in one call per length
    sample  one id per active row from its last logits (pure function, per-row parameters)
    filter  rows that finished (length, stop, time limit) or were cancelled leave
    step    one onnxruntime call advances every remaining row by one character

Results flow back to the event loop in batches: the worker appends ids to each request and
wakes the loop at most once per step, so a slow reader never slows the batch; it simply
finds several characters waiting.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from app import rng as rng_mod
from app.sampling import sample_next, softmax
from app.stops import StopMatcher

log = logging.getLogger(__name__)

TOP_ALTERNATIVES = 5


class QueueFullError(Exception):
    def __init__(self, model: str, depth: int, retry_after: int) -> None:
        self.model, self.depth, self.retry_after = model, depth, retry_after
        super().__init__(f"model {model!r} is at capacity ({depth} requests waiting); "
                         f"retry after {retry_after} s")


class EngineClosedError(Exception):
    """The engine no longer admits requests (draining or stopped)."""


class StepModel(Protocol):
    """What the engine needs from a model: the loader's OnnxModel satisfies it."""

    name: str

    # States are opaque to the engine (host arrays or device buffers): typed Any on purpose.
    def zero_states(self, rows: int) -> Any: ...
    def select(self, states: Any, rows: npt.NDArray[np.intp]) -> Any: ...
    def concat(self, parts: list[Any]) -> Any: ...
    def step(self, ids: npt.NDArray[np.int32],
             states: Any) -> tuple[npt.NDArray[np.float32], Any]: ...


class EngineObserver(Protocol):
    """Metrics hooks; the engine calls them from its worker thread."""

    def on_step(self, batch: int, seconds: float) -> None: ...
    def on_prefill(self, rows: int, chars: int, seconds: float) -> None: ...
    def on_queue(self, waiting: int, active: int) -> None: ...
    def on_finish(self, request: Request) -> None: ...


@dataclass
class GenerationParams:
    seed_ids: npt.NDArray[np.int32]  # (T,), non-empty
    max_new: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: list[tuple[int, ...]] = field(default_factory=list)
    time_limit_s: float = 60.0
    details: bool = False
    # True: wake the reader as characters arrive (streams). False: only when finished, so a
    # caller waiting for the whole text costs the event loop nothing per step.
    stream: bool = False


@dataclass
class TokenDetail:
    prob: float  # probability the model (temperature 1) gave the chosen id
    top: list[tuple[int, float]]  # the most likely ids and their probabilities


_ids = itertools.count(1)


class Request:
    """One generation. The worker thread writes; the event loop reads after `updated` fires.

    Writes are appends and single assignments (atomic under the GIL); `finish_reason` is set
    only after the last id is appended, so a reader that sees it also sees every id.
    """

    def __init__(self, params: GenerationParams) -> None:
        self.id = next(_ids)
        self.params = params
        self.ids: list[int] = []  # emitted (safe) ids, never part of a stop sequence
        self.details: list[TokenDetail] = []  # one per sampled id, emitted or held
        self.sampled = 0
        self.finish_reason: str | None = None  # length | stop | time_limit | cancelled | error
        self.error: str | None = None
        self.cancelled = False
        self.updated = asyncio.Event()
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.first_at: float | None = None
        self.finished_at: float | None = None
        self.prefill_s = 0.0
        self.matcher: StopMatcher[int] = StopMatcher(params.stop)
        self._on_cancel: Callable[[], None] | None = None  # set by the engine at submit

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the worker to drop this row at its next step (safe from any thread)."""
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()

    def timings(self) -> dict[str, float]:
        end = self.finished_at or time.perf_counter()
        admitted = self.admitted_at or end
        first = self.first_at or end
        return {
            "queue_ms": round((admitted - self.submitted_at) * 1e3, 3),
            "prefill_ms": round(self.prefill_s * 1e3, 3),
            "first_char_ms": round((first - self.submitted_at) * 1e3, 3),
            "decode_ms": round(max(end - admitted - self.prefill_s, 0.0) * 1e3, 3),
            "total_ms": round((end - self.submitted_at) * 1e3, 3),
        }

    async def wait(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait for news (new ids or the finish); False on timeout."""
        if not self.updated.is_set():
            try:
                # asyncio.timeout, not wait_for: no extra Task per wake-up on the hot path.
                async with asyncio.timeout(timeout):
                    await self.updated.wait()
            except TimeoutError:
                return False
        self.updated.clear()
        return True


class _Batch:
    """Active rows and their parameters, filtered and concatenated together."""

    def __init__(self, model: StepModel) -> None:
        self.model = model
        self.reqs: list[Request] = []
        self.logits = np.zeros((0, 0), np.float32)  # (B, V): next-id logits per row
        self.states: Any = model.zero_states(0)
        self.temperature = np.zeros(0, np.float32)
        self.top_k = np.zeros(0, np.int64)
        self.top_p = np.zeros(0, np.float32)
        self.keys = np.zeros(0, np.uint64)
        self.counters = np.zeros(0, np.uint64)
        self.remaining = np.zeros(0, np.int64)
        self.deadline = np.zeros(0, np.float64)
        # Rows needing per-row Python work; most rows need none, so the hot loop skips them.
        self.stop_rows: frozenset[int] = frozenset()
        self.detail_rows: list[int] = []
        self.stream_reqs: list[Request] = []
        self.fresh_rows: list[int] = []  # admitted since the last step: their first char is next

    def __len__(self) -> int:
        return len(self.reqs)

    def add(self, reqs: list[Request], logits: npt.NDArray[np.float32], states: Any) -> None:
        p = [r.params for r in reqs]
        self.logits = logits if not self.reqs else np.concatenate([self.logits, logits])
        self.states = self.model.concat([self.states, states])
        self.temperature = np.concatenate([self.temperature,
                                           np.array([x.temperature for x in p], np.float32)])
        self.top_k = np.concatenate([self.top_k, np.array([x.top_k for x in p], np.int64)])
        self.top_p = np.concatenate([self.top_p, np.array([x.top_p for x in p], np.float32)])
        self.keys = np.concatenate([self.keys, rng_mod.row_keys([x.seed for x in p])])
        self.counters = np.concatenate([self.counters, np.zeros(len(p), np.uint64)])
        self.remaining = np.concatenate([self.remaining, np.array([x.max_new for x in p])])
        # The time limit runs from submission, so time spent queued counts against it.
        self.deadline = np.concatenate([self.deadline, np.array(
            [r.submitted_at + r.params.time_limit_s for r in reqs], np.float64)])
        start = len(self.reqs)
        self.reqs.extend(reqs)
        self.fresh_rows.extend(range(start, len(self.reqs)))
        self._index_rows()

    def _index_rows(self) -> None:
        self.stop_rows = frozenset(i for i, r in enumerate(self.reqs) if r.matcher.stops)
        self.detail_rows = [i for i, r in enumerate(self.reqs) if r.params.details]
        self.stream_reqs = [r for r in self.reqs if r.params.stream]

    def keep(self, rows: npt.NDArray[np.intp]) -> None:
        self.reqs = [self.reqs[i] for i in rows]
        self.logits = self.logits[rows]
        if len(rows):
            self.states = self.model.select(self.states, rows)
        else:
            self.states = self.model.zero_states(0)
        for name in ("temperature", "top_k", "top_p", "keys", "counters", "remaining",
                     "deadline"):
            setattr(self, name, getattr(self, name)[rows])
        self.fresh_rows = []  # keep() runs only after a step, which consumed them
        self._index_rows()


class Engine:
    """Continuous batching for one model on one worker thread."""

    def __init__(self, model: StepModel, max_batch: int = 256, max_queue: int = 256,
                 retry_after_s: int = 1, observer: EngineObserver | None = None,
                 prefill_chunk_chars: int = 1024) -> None:
        self.model = model
        self.max_batch = max_batch
        # Seed characters prefilled per engine iteration: running rows wait for every prefill
        # call, so a burst of long seeds is admitted in slices instead of one long stall.
        self.prefill_chunk_chars = prefill_chunk_chars
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.observer = observer
        self._waiting: deque[Request] = deque()
        self._batch = _Batch(model)
        self._cv = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Loop wake-ups: requests touched since the last flush, and whether one is scheduled.
        self._dirty: set[Request] = set()
        self._dirty_lock = threading.Lock()
        self._flush_scheduled = False
        self._last_wake = 0.0
        self._cancel_seen = threading.Event()  # set by Request.cancel: scan rows next step
        self.fault: Callable[[], None] | None = None  # test hook: raise inside a step

    # --- event-loop side ----------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._batch)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def start(self) -> None:
        """Start the worker; call from the event loop that will read the results."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.model.name}",
                                        daemon=True)
        self._thread.start()

    def submit(self, params: GenerationParams) -> Request:
        if not self._accepting:
            raise EngineClosedError(f"model {self.model.name!r} is not accepting requests")
        with self._cv:
            # Full means every row busy and the queue full. Counting free rows too matters:
            # under a burst the worker may not have admitted the last arrivals yet.
            if len(self._waiting) + len(self._batch) >= self.max_batch + self.max_queue:
                raise QueueFullError(self.model.name, len(self._waiting), self.retry_after_s)
            req = Request(params)
            req._on_cancel = self._cancel_seen.set
            self._waiting.append(req)
            self._cv.notify()
        return req

    def stop_admitting(self) -> None:
        self._accepting = False

    async def drain(self, grace_s: float) -> bool:
        """Stop admitting and wait up to grace_s for queued and running requests to end."""
        self.stop_admitting()
        deadline = time.perf_counter() + grace_s
        # Polling keeps the worker free of loop callbacks; 50 ms is nothing next to a drain.
        while (self.waiting or self.active) and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return not (self.waiting or self.active)

    def close(self) -> None:
        """Stop the worker; anything still running finishes as cancelled."""
        self._accepting = False
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- worker side ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopping and not self._waiting and not self._batch.reqs:
                        self._wake(force=True)  # deliver what is pending before idling
                        self._cv.wait(timeout=1.0)
                    if self._stopping:
                        break
                self._admit()
                if self._batch.reqs:
                    self._decode_step()
        finally:
            pending = list(self._waiting) + self._batch.reqs
            self._waiting.clear()
            for r in pending:
                self._finish(r, "cancelled")
            self._batch.keep(np.zeros(0, np.intp))
            self._wake(force=True)

    def _admit(self) -> None:
        room = self.max_batch - len(self._batch)
        if room <= 0 or not self._waiting:
            return
        taken: list[Request] = []
        chars = 0
        with self._cv:
            while self._waiting and len(taken) < room:
                size = len(self._waiting[0].params.seed_ids)
                if taken and chars + size > self.prefill_chunk_chars:
                    break
                taken.append(self._waiting.popleft())
                chars += size
        now = time.perf_counter()
        live = []
        for r in taken:
            r.admitted_at = now
            if r.cancelled:
                self._finish(r, "cancelled")
            elif now >= r.submitted_at + r.params.time_limit_s:
                self._finish(r, "time_limit")
            else:
                live.append(r)
        # One prefill call per distinct seed length: equal lengths need no padding.
        by_len: dict[int, list[Request]] = {}
        for r in live:
            by_len.setdefault(len(r.params.seed_ids), []).append(r)
        for group in by_len.values():
            self._prefill(group)
        if self.observer:
            self.observer.on_queue(len(self._waiting), len(self._batch))
        self._wake()

    def _prefill(self, group: list[Request]) -> None:
        ids = np.stack([r.params.seed_ids for r in group]).astype(np.int32)  # (G, T)
        t0 = time.perf_counter()
        try:
            if self.fault:
                self.fault()
            logits, states = self.model.step(ids, self.model.zero_states(len(group)))
        except Exception as exc:  # onnxruntime errors are not a fixed type
            log.exception("prefill failed for %d request(s) on %s", len(group), self.model.name)
            for r in group:
                # The caller learns what failed; details (paths, internals) stay in the log.
                self._finish(r, "error", f"model error during prefill ({type(exc).__name__})")
            return
        seconds = time.perf_counter() - t0
        for r in group:
            r.prefill_s = seconds
        if self.observer:
            self.observer.on_prefill(len(group), int(ids.size), seconds)
        self._batch.add(group, np.ascontiguousarray(logits[:, -1, :]), states)

    def _decode_step(self) -> None:
        b = self._batch
        u = rng_mod.uniforms(b.keys, b.counters)
        nxt = sample_next(b.logits, b.temperature, b.top_k, b.top_p, u)  # (B,)
        b.counters += np.uint64(1)
        b.remaining -= 1
        if b.detail_rows:
            self._record_details(b, nxt, b.detail_rows)
        now = time.perf_counter()
        for i in b.fresh_rows:
            b.reqs[i].first_at = now
        b.fresh_rows = []
        reqs = b.reqs
        toks = nxt.tolist()
        ended: dict[int, str] = {}
        # The per-row Python work is one append, except for rows with stop strings.
        if b.stop_rows:
            for i, (r, tok) in enumerate(zip(reqs, toks, strict=True)):
                if i in b.stop_rows:
                    emit, stopped = r.matcher.push(tok)
                    r.ids.extend(emit)
                    if stopped:
                        ended[i] = "stop"
                else:
                    r.ids.append(tok)
        else:
            for r, tok in zip(reqs, toks, strict=True):
                r.ids.append(tok)
        if self._cancel_seen.is_set():
            self._cancel_seen.clear()
            for i, r in enumerate(reqs):
                if r.cancelled:
                    ended[i] = "cancelled"
        for i in np.flatnonzero(b.remaining <= 0).tolist():
            ended.setdefault(i, "length")
        for i in np.flatnonzero(now >= b.deadline).tolist():
            ended.setdefault(i, "time_limit")
        if b.stream_reqs:
            with self._dirty_lock:
                self._dirty.update(b.stream_reqs)
        if ended:
            for i, reason in ended.items():
                r = reqs[i]
                r.sampled = int(b.counters[i])
                if reason in ("length", "time_limit"):
                    r.ids.extend(r.matcher.flush())
                self._finish(r, reason)
            keep = np.array([i for i in range(len(reqs)) if i not in ended], np.intp)
            b.keep(keep)
            nxt = nxt[keep]
            if self.observer:
                self.observer.on_queue(len(self._waiting), len(b))
        self._wake()
        if not len(b):
            return
        t0 = time.perf_counter()
        try:
            if self.fault:
                self.fault()
            logits, b.states = self.model.step(nxt.astype(np.int32)[:, None], b.states)
        except Exception as exc:
            log.exception("decode step failed for a batch of %d on %s", len(b), self.model.name)
            for r in b.reqs:
                self._finish(r, "error", f"model error during decoding ({type(exc).__name__})")
            b.keep(np.zeros(0, np.intp))
            self._wake()
            return
        b.logits = logits[:, -1, :]
        if self.observer:
            self.observer.on_step(len(b), time.perf_counter() - t0)

    def _record_details(self, b: _Batch, nxt: npt.NDArray[np.int64], rows: list[int]) -> None:
        probs = softmax(b.logits[rows])  # (R, V), the model's own distribution (T = 1)
        top = np.argsort(-probs, axis=-1)[:, :TOP_ALTERNATIVES]
        for j, i in enumerate(rows):
            tok = int(nxt[i])
            b.reqs[i].details.append(TokenDetail(
                prob=float(probs[j, tok]),
                top=[(int(t), float(probs[j, t])) for t in top[j]],
            ))

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        r.error = error
        r.finished_at = time.perf_counter()
        r.finish_reason = reason  # last: readers that see it see everything else
        with self._dirty_lock:
            self._dirty.add(r)
        if self.observer:
            self.observer.on_finish(r)

    # Each wake-up costs the event loop ~tens of µs per stream woken (format and write one
    # SSE event), and the loop shares the GIL with this worker. Waking at most every
    # 250 µs x streams (capped at 20 ms) keeps that cost a bounded share of the time: one
    # character per event for a few streams, several per event when many are running.
    WAKE_S_PER_STREAM = 250e-6
    MAX_WAKE_INTERVAL_S = 0.02

    def _wake(self, force: bool = False) -> None:
        """Schedule one flush on the loop unless one is pending or the last was too recent."""
        now = time.perf_counter()
        interval = min(self.MAX_WAKE_INTERVAL_S, self.WAKE_S_PER_STREAM
                       * len(self._batch.stream_reqs))
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
