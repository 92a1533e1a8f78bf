"""The decode loop for one model, with no threads, no event loop and no I/O.

A driver (app.engine.local: a worker thread; app.engine.process: its own process) feeds it
sequences and calls `iterate()` while there is work. Life of a sequence:

    wait     queued until a batch row is free (admission by predicted wait happens before)
    prefill  its seed runs through the graph in slices of at most `prefill_chunk_chars` per
             iteration, shared by every sequence in prefill, so a long seed never stalls the
             running rows for longer than one slice
    decode   one id per iteration: sample from the last logits, filter finished rows, then
             one onnxruntime call advances every remaining row by one character. With a
             decode graph (app/decode.py) the graph samples too, K ids per row per call; a
             row then holds the id it feeds next instead of logits (see `_decode_graph`)
    finish   length | stop | time_limit | cancelled | error

Whatever one sequence does wrong (parameters the arrays cannot hold, a graph error in its
prefill) fails that sequence alone; a failing decode step fails the rows in that step.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from app import rng as rng_mod
from app.decode import DecodeGraph, DecodeGraphs, block_uniforms
from app.engine.cache import StateCache, prefix_digests
from app.sampling import sample_next, softmax
from app.stops import StopMatcher

log = logging.getLogger(__name__)

TOP_ALTERNATIVES = 5
# Largest values the per-row arrays hold; the HTTP schema refuses larger ones first, and a
# sequence that reaches the engine with more fails alone instead of breaking the batch.
MAX_TOP_K = 2**31 - 1
MAX_SEED = 2**63


class StepModel(Protocol):
    """What the engine needs from a model: the loader's OnnxModel satisfies it."""

    name: str

    # States are opaque to the engine (host arrays or device buffers): typed Any on purpose.
    def zero_states(self, rows: int) -> Any: ...
    def select(self, states: Any, rows: npt.NDArray[np.intp]) -> Any: ...
    def concat(self, parts: list[Any]) -> Any: ...
    def states_from_host(self, arrays: list[npt.NDArray[np.float32]]) -> Any: ...
    def states_to_host(self, states: Any) -> list[npt.NDArray[np.float32]]: ...
    def step(self, ids: npt.NDArray[np.int32],
             states: Any) -> tuple[npt.NDArray[np.float32], Any]: ...


class EngineObserver(Protocol):
    """Metrics hooks; the engine calls them from the thread or process that drives it."""

    def on_step(self, batch: int, seconds: float) -> None: ...
    def on_prefill(self, rows: int, chars: int, seconds: float) -> None: ...
    def on_queue(self, waiting: int, active: int) -> None: ...
    def on_finish(self, seq: Sequence) -> None: ...
    def on_refusal_verdict(self, false: bool) -> None: ...
    def on_estimate(self, wait_s: float, chars_per_s: float) -> None: ...
    def on_cache(self, hit: bool, chars_saved: int, size_bytes: int, entries: int) -> None: ...


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
    # True: the reader wants characters as they arrive (streams). False: only the finish,
    # so a caller waiting for the whole text costs its event loop nothing per step.
    stream: bool = False
    # Continuations: start from these states (one (1, size) array per state tensor) instead
    # of zeros, with the random stream at `counter_start`; `resumable` keeps the final state.
    initial_states: list[npt.NDArray[np.float32]] | None = None
    counter_start: int = 0
    resumable: bool = False
    # State-cache partition (a digest of the caller's API key): one caller's cached seeds
    # never speed up, and so never reveal themselves to, another.
    cache_scope: bytes = b""

    def check(self) -> None:
        """Raise ValueError unless every field fits the engine's arrays."""
        if len(self.seed_ids) == 0:
            raise ValueError("seed must have at least one id")
        if not 1 <= self.max_new < 2**62:
            raise ValueError(f"max_new out of range: {self.max_new}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature out of range: {self.temperature}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k out of range: {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p out of range: {self.top_p}")
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed out of range: {self.seed}")
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s out of range: {self.time_limit_s}")
        if not 0 <= self.counter_start < 2**62:
            raise ValueError(f"counter_start out of range: {self.counter_start}")


@dataclass
class TokenDetail:
    prob: float  # probability the model (temperature 1) gave the chosen id
    top: list[tuple[int, float]]  # the most likely ids and their probabilities


_ids = itertools.count(1)


class Sequence:
    """One generation as the engine sees it. The driver's reader reads it after a wake-up.

    Writes are appends and single assignments (atomic under the GIL); `finish_reason` is set
    only after the last id is appended, so a reader that sees it also sees every id.
    """

    def __init__(self, params: GenerationParams, submitted_at: float | None = None) -> None:
        self.id = next(_ids)
        self.params = params
        self.ids: list[int] = []  # emitted (safe) ids, never part of a stop sequence
        self.details: list[TokenDetail] = []  # one per sampled id, emitted or held
        self.sampled = 0
        self.finish_reason: str | None = None  # length | stop | time_limit | cancelled | error
        self.error: str | None = None
        self.cancelled = False
        self.abort_error: str | None = None  # with cancelled: end as "error" with this
        self.submitted_at = time.perf_counter() if submitted_at is None else submitted_at
        self.admitted_at: float | None = None
        self.first_at: float | None = None
        self.finished_at: float | None = None
        self.prefill_s = 0.0
        self.matcher: StopMatcher[int] = StopMatcher(params.stop)
        # Prefill progress: seed ids consumed so far and the state after them.
        self.prefilled = 0
        self.states: Any = None
        self.digests: dict[int, bytes] = {}  # state-cache keys of the seed's prefixes
        # For a resumable request that ended by length or time: (the state before its last
        # character, that character, characters sampled), so it can be continued exactly.
        self.final: tuple[list[npt.NDArray[np.float32]], int, int] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def deadline(self) -> float:
        # The time limit runs from submission, so time spent queued counts against it.
        return self.submitted_at + self.params.time_limit_s

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


class Batch:
    """Rows in decode and their per-row parameters, appended and filtered together."""

    def __init__(self, model: StepModel) -> None:
        self.model = model
        self.seqs: list[Sequence] = []
        self.logits = np.zeros((0, 0), np.float32)  # (B, V): next-id logits per row
        self.states: Any = model.zero_states(0)
        self.temperature = np.zeros(0, np.float32)
        self.top_k = np.zeros(0, np.int64)
        self.top_p = np.zeros(0, np.float64)
        self.keys = np.zeros(0, np.uint64)
        self.counters = np.zeros(0, np.uint64)
        self.remaining = np.zeros(0, np.int64)
        self.deadline = np.zeros(0, np.float64)
        # With a decode graph: the id each row feeds next (already emitted); rows in
        # fresh_rows have none yet, they sample their first id from `logits` on the host.
        self.pending = np.zeros(0, np.int32)
        # Rows needing per-row Python work; most rows need none, so the hot loop skips them.
        self.stop_rows: frozenset[int] = frozenset()
        self.detail_rows: list[int] = []
        self.fresh_rows: list[int] = []  # joined since the last step: their first char is next

    def __len__(self) -> int:
        return len(self.seqs)

    def append(self, seqs: list[Sequence], logits: npt.NDArray[np.float32], states: Any) -> None:
        """Rows whose prefill just finished join. Every array is built before any is
        assigned, so a failure leaves the batch as it was."""
        p = [s.params for s in seqs]
        new = {
            "logits": logits if not self.seqs else np.concatenate([self.logits, logits]),
            "states": self.model.concat([self.states, states]),
            "temperature": np.concatenate([self.temperature, np.array(
                [x.temperature for x in p], np.float32)]),
            "top_k": np.concatenate([self.top_k, np.array([x.top_k for x in p], np.int64)]),
            # float64: a top_p of 1e-50 must stay above 0 (it keeps only the likeliest id).
            "top_p": np.concatenate([self.top_p, np.array([x.top_p for x in p], np.float64)]),
            "keys": np.concatenate([self.keys, rng_mod.row_keys([x.seed for x in p])]),
            "counters": np.concatenate([self.counters, np.array([x.counter_start for x in p],
                                                                np.uint64)]),
            "remaining": np.concatenate([self.remaining, np.array([x.max_new for x in p],
                                                                  np.int64)]),
            "deadline": np.concatenate([self.deadline, np.array([s.deadline for s in seqs],
                                                                np.float64)]),
            "pending": np.concatenate([self.pending, np.zeros(len(seqs), np.int32)]),
        }
        for name, value in new.items():
            setattr(self, name, value)
        start = len(self.seqs)
        self.seqs.extend(seqs)
        self.fresh_rows.extend(range(start, len(self.seqs)))
        self._index_rows()

    def _index_rows(self) -> None:
        self.stop_rows = frozenset(i for i, s in enumerate(self.seqs) if s.matcher.stops)
        self.detail_rows = [i for i, s in enumerate(self.seqs) if s.params.details]

    def filter(self, rows: npt.NDArray[np.intp]) -> None:
        """Keep only `rows`, in that order: finished rows leave after a step."""
        self.seqs = [self.seqs[i] for i in rows]
        self.logits = self.logits[rows]
        self.states = (self.model.select(self.states, rows) if len(rows)
                       else self.model.zero_states(0))
        for name in ("temperature", "top_k", "top_p", "keys", "counters", "remaining",
                     "deadline", "pending"):
            setattr(self, name, getattr(self, name)[rows])
        self.fresh_rows = []  # filter() runs only after a step, which consumed them
        self._index_rows()


@dataclass
class _Refusal:
    """A request refused for its predicted wait, judged once the queue shows the truth."""

    at: float
    ahead: int  # admissions still to come before the one that would have been its row
    run_s: float  # how long it would have held that row (predicted at refusal)


class QueueFullError(Exception):
    """Refused at admission: the predicted wait (or the queue's hard cap) is too long."""

    def __init__(self, model: str, message: str, retry_after: int) -> None:
        self.model, self.retry_after = model, retry_after
        super().__init__(message)


class EngineCore:
    """Continuous batching for one model; single-threaded, driven by `iterate()`."""

    # Timing history for the predictions: medians of the last N, so one slow call (the
    # first after idle, a noisy neighbour) does not turn into refusals.
    HISTORY = 32
    # The gate is soft: it refuses only what the estimate puts this far past the bound, so
    # an estimate up to 25% pessimistic (this machine's speed swings) refuses nobody who
    # would have been served within it. Measured: with the gate at the bound itself, retries
    # come back just as the predicted wait reaches it, and 40-100% of refusals were false.
    REFUSE_PAST = 1.25

    def __init__(self, model: StepModel, max_batch: int = 256, max_queue: int = 256,
                 prefill_chunk_chars: int = 256, max_wait_s: float = 10.0,
                 observer: EngineObserver | None = None, state_cache_bytes: int = 0,
                 decode: DecodeGraphs | None = None) -> None:
        self.model = model
        self.decode = decode
        # Characters each row gains per decode call: the predictions count in characters.
        self.chars_per_call = decode.steps.steps if decode else 1
        self._last_k = self.chars_per_call  # of the last decode call (K = 1 while prefilling)
        self.cache = StateCache(state_cache_bytes) if state_cache_bytes > 0 else None
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk_chars = prefill_chunk_chars
        self.max_wait_s = max_wait_s
        self.observer = observer
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []  # hold a row, seed not yet fully consumed
        self.batch = Batch(model)
        # Iteration time at B rows ~ factor * (step_fixed_s + step_row_s * B): the graph's
        # cost measured by calibrate(), times the live ratio of measured iteration periods
        # (everything rows wait for: prefill slices, admission, the GIL) to that model.
        self.step_fixed_s = 0.001
        self.step_row_s = 0.0
        # The same for the call made while seeds prefill (the K = 1 decode graph; with host
        # sampling, or without a K = 1 graph, the same call as always).
        self.single_fixed_s = 0.001
        self.single_row_s = 0.0
        self._ratios: deque[float] = deque(maxlen=self.HISTORY)
        self.factor = 1.0
        self._last_decode_at: float | None = None
        # Seconds spent judging submissions since the last decode: a burst of hundreds of
        # them lengthens one period once, and must not read as every iteration being slow.
        self._judging_s = 0.0
        self._prefill_rates: deque[float] = deque(maxlen=self.HISTORY)  # s per seed char
        self.prefill_s_per_char = 0.0  # median prefill cost per seed character, seconds
        self.chars_per_s = 0.0  # characters delivered per second at the last batch size
        self.touched: list[Sequence] = []  # sequences with news since the driver last looked
        # Refusals awaiting a verdict (bounded: a sample is enough for a rate).
        self._refusals: list[_Refusal] = []
        self._virtual_rows: list[float] = []  # when rows given to refused requests free
        self._published: tuple[int, int] | None = None  # what publish() last reported
        self.false_refusals = 0
        self.justified_refusals = 0

    # --- queries --------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Rows held: decoding or in prefill."""
        return len(self.batch) + len(self.prefilling)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.batch.seqs)

    @property
    def iteration_s(self) -> float:
        """Predicted seconds per iteration with every row busy (when anyone waits, they are)."""
        return self.factor * (self.step_fixed_s + self.step_row_s * self.max_batch)

    @property
    def prefill_iteration_s(self) -> float:
        """The same for an iteration that also prefills (its decode call is the K = 1 one)."""
        return self.factor * (self.single_fixed_s + self.single_row_s * self.max_batch)

    def calls(self, chars: int | npt.NDArray[np.int64]) -> Any:
        """Decode calls until a row has `chars` more characters (K per call)."""
        return -(-chars // self.chars_per_call)

    @property
    def graph_files(self) -> str:
        """What decodes: the step graph, and the decode graph when one samples in the graph."""
        step = str(getattr(self.model, "graph_file", "model.onnx"))
        return f"{step} + {self.decode.files}" if self.decode else step

    def calibrate(self, repeats: int = 3) -> None:
        """Time a decode iteration (graph call, random draws, sampling) at 1 and `max_batch`
        rows for the wait predictions, so the first burst is judged at full-batch speed,
        not at an empty batch's."""
        def timed(rows: int, graph: DecodeGraph | None) -> float:
            ids = np.zeros((rows, 1), np.int32)
            states = self.model.zero_states(rows)
            keys, counters = rng_mod.row_keys(np.arange(rows)), np.zeros(rows, np.uint64)
            temperature = np.ones(rows, np.float32)
            top_k, top_p = np.zeros(rows, np.int64), np.ones(rows, np.float64)
            times = []
            for _ in range(repeats + 1):  # the first call allocates: not counted
                t0 = time.perf_counter()
                if graph is not None:
                    graph.run(ids[:, 0], self.model.states_to_host(states), temperature, top_k,
                              top_p, block_uniforms(keys, counters, graph.steps),
                              details=False).ids.tolist()
                else:
                    logits, _ = self.model.step(ids, states)
                    u = rng_mod.uniforms(keys, counters)
                    sample_next(logits[:, -1, :], temperature, top_k, top_p, u).tolist()
                times.append(time.perf_counter() - t0)
            return statistics.median(times[1:])

        def fit(graph: DecodeGraph | None) -> tuple[float, float]:
            one = timed(1, graph)
            full = timed(self.max_batch, graph) if self.max_batch > 1 else one
            row = max(full - one, 0.0) / max(self.max_batch - 1, 1)
            return max(one - row, 1e-6), row

        main = self.decode.steps if self.decode else None
        self.step_fixed_s, self.step_row_s = fit(main)
        single = self.decode.single if self.decode else None
        self.single_fixed_s, self.single_row_s = (fit(single) if single is not None else
                                                  (self.step_fixed_s, self.step_row_s))

    def prefill_iterations(self, seed_chars: int) -> int:
        return -(-seed_chars // self.prefill_chunk_chars)

    def predict_wait(self, params: GenerationParams | None = None) -> float:
        """Seconds until a request submitted now would get a row (0 when one is free).

        Simulates the FIFO queue over the rows' remaining work in iterations: every row frees
        after its remaining characters, each waiting request then holds the first row to free
        for its prefill slices and its characters. Pessimistic where stops end rows early."""
        free = self.max_batch - self.active
        if free > len(self.waiting):
            return 0.0
        per_iter = self.iteration_s or 0.001
        per_prefill = self.prefill_iteration_s or 0.001
        now = time.perf_counter()
        # When each row frees, in seconds from now: after its remaining characters, or at
        # its time limit if that comes first.
        frees = [0.0] * max(free, 0)
        if len(self.batch):
            frees += np.minimum(self.calls(self.batch.remaining) * per_iter,
                                np.maximum(self.batch.deadline - now, 0.0)).tolist()
        frees += [min(self.prefill_iterations(len(s.params.seed_ids) - s.prefilled)
                      * per_prefill + self.calls(s.params.max_new) * per_iter,
                      max(s.deadline - now, 0.0))
                  for s in self.prefilling]
        # Queued seeds ahead of the newcomer will slow every iteration while they prefill
        # (prefill already under way is in the measured iteration period).
        prefill_chars = 0
        heapq.heapify(frees)
        for s in self.waiting:
            start = heapq.heappop(frees)
            run = self.predict_run(s.params)
            heapq.heappush(frees, start + min(run, max(s.deadline - now - start, 0.0)))
            prefill_chars += len(s.params.seed_ids)
        return frees[0] + prefill_chars * self.prefill_s_per_char

    def predict_run(self, params: GenerationParams) -> float:
        """Seconds a request would take once it holds a row, at the current iteration time."""
        return float(self.prefill_iterations(len(params.seed_ids))
                     * (self.prefill_iteration_s or 0.001)
                     + self.calls(params.max_new) * (self.iteration_s or 0.001))

    # --- submission -----------------------------------------------------------------------
    def admission(self, params: GenerationParams) -> tuple[float, str | None, int]:
        """(predicted wait s, refusal message or None, Retry-After s) for a request now."""
        t0 = time.perf_counter()
        try:
            return self._admission(params)
        finally:
            self._judging_s += time.perf_counter() - t0

    def _admission(self, params: GenerationParams) -> tuple[float, str | None, int]:
        # Queued beyond the free rows: a burst decided in one go is admitted into free rows
        # at the same iteration, so those do not count against the queue.
        if len(self.waiting) - max(self.max_batch - self.active, 0) >= self.max_queue:
            wait = self.predict_wait(params)
            return wait, (f"model {self.model.name!r} is at capacity ({len(self.waiting)} "
                          f"requests waiting)"), self._retry_after(wait)
        wait = self.predict_wait(params)
        if wait > self.max_wait_s * self.REFUSE_PAST:
            if len(self._refusals) < 256:
                # In the queue it would have stood behind everyone waiting and behind the
                # requests refused before it (each of those needs a row first).
                self._refusals.append(_Refusal(time.perf_counter(),
                                               len(self.waiting) + len(self._refusals),
                                               self.predict_run(params)))
            return wait, (f"model {self.model.name!r} is overloaded: a new request would wait "
                          f"about {wait:.1f} s for a row (limit {self.max_wait_s:g} s)"), \
                self._retry_after(wait)
        limit = params.time_limit_s
        if wait > 0:
            log.debug("admit %s: predicted wait %.3f s (iteration %.2f ms x factor %.2f), "
                      "%d rows, %d waiting", self.model.name, wait, self.iteration_s * 1e3,
                      self.factor, self.active, len(self.waiting))
        if wait > 0 and wait + self.predict_run(params) > limit:
            return wait, (f"model {self.model.name!r} cannot finish this request within its "
                          f"time limit of {limit:g} s now (about {wait:.1f} s of queue ahead)"
                          ), self._retry_after(wait, target=max(limit - self.predict_run(
                              params), 0.0))
        return wait, None, 0

    def _retry_after(self, wait: float, target: float | None = None) -> int:
        # Without new arrivals the predicted wait falls one second per second; retrying once
        # it has fallen under the bound gets served.
        target = self.max_wait_s if target is None else min(target, self.max_wait_s)
        return max(1, min(3600, math.ceil(wait - target)))

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; parameters that do not fit fail it at once (it never queues)."""
        try:
            seq.params.check()
            StopMatcher(seq.params.stop)  # stop ids must be hashable tuples
        except Exception as exc:
            self._finish(seq, "error", f"invalid generation parameters: {exc}")
            return
        self.waiting.append(seq)

    def cancel_flagged(self) -> None:
        """Drop every cancelled sequence now: queued, in prefill or decoding."""
        def end(s: Sequence) -> None:
            if s.abort_error is not None:
                self._finish(s, "error", s.abort_error)
            else:
                self._finish(s, "cancelled")

        for s in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(s)
            end(s)
        for s in [s for s in self.prefilling if s.cancelled]:
            self.prefilling.remove(s)
            end(s)
        rows = [i for i, s in enumerate(self.batch.seqs) if s.cancelled]
        if rows:
            for i in rows:
                self.batch.seqs[i].sampled = int(self.batch.counters[i])
                end(self.batch.seqs[i])
            self._drop_rows(set(rows))
        self.publish()

    def publish(self) -> None:
        """Queue depth and rows held, for the metrics (after anything that changes them).
        Written only when they changed: every iteration calls this, and a multiprocess gauge
        write costs a few microseconds of the decode loop."""
        now = (len(self.waiting), self.active)
        if self.observer and now != self._published:
            self._published = now
            self.observer.on_queue(*now)

    def abort_all(self, reason: str, error: str | None) -> None:
        """End everything at once (drain timeout, engine shutdown)."""
        for i, s in enumerate(self.batch.seqs):
            s.sampled = int(self.batch.counters[i])
        for s in [*self.waiting, *self.prefilling, *self.batch.seqs]:
            if s.matcher.stops and reason != "cancelled":
                s.ids.extend(s.matcher.flush())
            self._finish(s, reason, error)
        self.waiting.clear()
        self.prefilling.clear()
        self.batch.filter(np.zeros(0, np.intp))
        self.publish()

    # --- one iteration ----------------------------------------------------------------------
    def iterate(self) -> None:
        """Admit into free rows, advance prefill by one slice, then one decode step."""
        self._admit()
        if self.prefilling:
            self._prefill_slice()
        if self.batch.seqs:
            rows = len(self.batch)
            now = time.perf_counter()
            if self._last_decode_at is not None:
                period = max(now - self._last_decode_at - self._judging_s, 1e-6)
                # Each period against the call it made: K = 1 while seeds prefilled.
                single = self._last_k == 1 < self.chars_per_call
                expected = (self.single_fixed_s + self.single_row_s * rows if single
                            else self.step_fixed_s + self.step_row_s * rows)
                self._ratios.append(period / expected)
                self.factor = max(statistics.median(self._ratios), 0.1)
                self.chars_per_s = rows * self._last_k / period
            self._last_decode_at = now
            self._judging_s = 0.0
            if self.decode is not None:
                self._decode_graph(self.decode)
            else:
                self._decode()
        else:
            self._last_decode_at = None  # idle gaps are not iteration time
        self.publish()

    _hit_logits: npt.NDArray[np.float32]

    def _from_cache(self, s: Sequence) -> bool:
        """Start `s` from its longest cached prefix; True when that is the whole seed (its
        state and next-id logits are then in s.states and self._hit_logits)."""
        assert self.cache is not None
        seed = s.params.seed_ids
        s.digests = prefix_digests(seed, self.prefill_chunk_chars, s.params.cache_scope)
        length, entry = self.cache.lookup(s.digests)
        if self.observer:
            self.observer.on_cache(entry is not None, length, self.cache.bytes,
                                   len(self.cache.entries))
        if entry is None:
            return False
        s.states, s.prefilled = entry.states, length
        if length == len(seed):
            self._hit_logits = entry.logits
            return True
        return False

    def _judge_refusals(self, now: float, all_: bool) -> None:
        """A refused request would have taken the row of the (ahead + 1)-th admission after
        it (FIFO), or the first free row once the queue emptied: a false refusal if that came
        within the bound. Run once per admission, or with all_ when rows are free."""
        still = []
        # Once the queue is empty, free rows go to the refused in order; a row given to one
        # stays taken (virtually) for its predicted run, so each free row serves one of them.
        while self._virtual_rows and self._virtual_rows[0] <= now:
            heapq.heappop(self._virtual_rows)
        free = self.max_batch - self.active - len(self._virtual_rows) if all_ else 0
        judged = 0
        for r in self._refusals:
            if (judged < free) if all_ else (r.ahead == 0):
                judged += 1
                if all_:
                    heapq.heappush(self._virtual_rows, now + r.run_s)
                false = now - r.at <= self.max_wait_s
                if false:
                    self.false_refusals += 1
                else:
                    self.justified_refusals += 1
                if self.observer:
                    self.observer.on_refusal_verdict(false)
            else:
                r.ahead = max(r.ahead - (judged if all_ else 1), 0)
                still.append(r)
        self._refusals = still

    def _admit(self) -> None:
        now = time.perf_counter()
        whole_hits: list[tuple[Sequence, Any, npt.NDArray[np.float32]]] = []
        while self.waiting and self.active + len(whole_hits) < self.max_batch:
            s = self.waiting.popleft()
            if self._refusals:
                self._judge_refusals(now, all_=False)
            s.admitted_at = now
            if s.cancelled:
                self._finish(s, "cancelled")
            elif now >= s.deadline:
                self._finish(s, "time_limit")
            else:
                s.states = None
                s.prefilled = 0
                if s.params.initial_states is not None:  # a continuation: no cache, no zeros
                    s.states = self.model.states_from_host(s.params.initial_states)
                    self.prefilling.append(s)
                elif self.cache is not None and self._from_cache(s):
                    whole_hits.append((s, s.states, self._hit_logits))
                    s.states = None
                else:
                    self.prefilling.append(s)
        if whole_hits:
            # Seeds cached whole join the batch at once: no graph call at all.
            seqs = [h[0] for h in whole_hits]
            try:
                self.batch.append(seqs, np.stack([h[2] for h in whole_hits]),
                                  self.model.concat([h[1] for h in whole_hits]))
            except Exception as exc:
                log.exception("could not add cached rows to the batch on %s", self.model.name)
                for s in seqs:
                    self._finish(s, "error", f"could not start decoding ({type(exc).__name__})")
        if self._refusals and not self.waiting and self.active < self.max_batch:
            self._judge_refusals(now, all_=True)

    def _prefill_slice(self) -> None:
        """Advance the sequences in prefill by at most `prefill_chunk_chars` characters in
        all, oldest first; equal slice lengths share one graph call (no padding needed)."""
        budget = self.prefill_chunk_chars
        by_len: dict[int, list[Sequence]] = {}
        for s in self.prefilling:
            if budget <= 0:
                break
            n = min(len(s.params.seed_ids) - s.prefilled, budget)
            end = s.prefilled + n
            every = self.prefill_chunk_chars
            if self.cache is not None and end < len(s.params.seed_ids) and end % every:
                # End a slice shortened by the shared budget on a cache boundary, when it
                # reaches one, so the state there can be kept.
                aligned = end - end % every
                if aligned > s.prefilled:
                    n = aligned - s.prefilled
            by_len.setdefault(n, []).append(s)
            budget -= n
        for n, group in by_len.items():
            self._prefill_group(group, n)

    def _prefill_group(self, group: list[Sequence], n: int) -> None:
        t0 = time.perf_counter()
        try:
            ids = np.stack([s.params.seed_ids[s.prefilled:s.prefilled + n]
                            for s in group]).astype(np.int32)  # (G, n)
            states = self.model.concat([s.states if s.states is not None
                                        else self.model.zero_states(1) for s in group])
            logits, out = self.model.step(ids, states)
        except Exception as exc:  # onnxruntime errors are not a fixed type
            log.exception("prefill failed for %d request(s) on %s", len(group), self.model.name)
            for s in group:
                self.prefilling.remove(s)
                # The caller learns what failed; details (paths, internals) stay in the log.
                self._finish(s, "error", f"model error during prefill ({type(exc).__name__})")
            return
        seconds = time.perf_counter() - t0
        self._prefill_rates.append(seconds / ids.size)
        self.prefill_s_per_char = statistics.median(self._prefill_rates)
        if self.observer:
            self.observer.on_prefill(len(group), int(ids.size), seconds)
        done: list[int] = []
        for j, s in enumerate(group):
            s.prefilled += n
            s.prefill_s += seconds
            row = None
            if s.prefilled >= len(s.params.seed_ids):
                done.append(j)
            else:
                row = s.states = self.model.select(out, np.array([j], np.intp))
            if self.cache is not None and s.prefilled in s.digests:
                if row is None:
                    row = self.model.select(out, np.array([j], np.intp))
                self.cache.store(s.digests[s.prefilled], row, logits[j, -1].copy())
        if not done:
            return
        rows = np.array(done, np.intp)
        joining = [group[j] for j in done]
        for s in joining:
            self.prefilling.remove(s)
            s.states = None
        try:
            self.batch.append(joining, np.ascontiguousarray(logits[rows, -1, :]),
                              self.model.select(out, rows) if len(done) < len(group) else out)
        except Exception as exc:
            log.exception("could not add %d row(s) to the batch on %s", len(joining),
                          self.model.name)
            for s in joining:
                self._finish(s, "error", f"could not start decoding ({type(exc).__name__})")

    def _decode(self) -> None:
        b = self.batch
        u = rng_mod.uniforms(b.keys, b.counters)
        nxt = sample_next(b.logits, b.temperature, b.top_k, b.top_p, u)  # (B,)
        b.counters += np.uint64(1)
        b.remaining -= 1
        if b.detail_rows:
            self._record_details(nxt, b.detail_rows)
        now = time.perf_counter()
        for i in b.fresh_rows:
            b.seqs[i].first_at = now
        b.fresh_rows = []
        seqs = b.seqs
        toks = nxt.tolist()
        ended: dict[int, str] = {}
        # The per-row Python work is one append, except for rows with stop strings.
        if b.stop_rows:
            for i, (s, tok) in enumerate(zip(seqs, toks, strict=True)):
                if i in b.stop_rows:
                    emit, stopped = s.matcher.push(tok)
                    s.ids.extend(emit)
                    if stopped:
                        ended[i] = "stop"
                else:
                    s.ids.append(tok)
        else:
            for s, tok in zip(seqs, toks, strict=True):
                s.ids.append(tok)
        self.touched.extend(seqs)
        for i in np.flatnonzero(b.remaining <= 0).tolist():
            ended.setdefault(i, "length")
        for i in np.flatnonzero(now >= b.deadline).tolist():
            ended.setdefault(i, "time_limit")
        if ended:
            for i, reason in ended.items():
                self._end_row(i, reason, int(b.counters[i]), int(nxt[i]),
                              partial(self._row_states, b.states, i))
            keep = self._drop_rows(set(ended))
            nxt = nxt[keep]
        if not len(b):
            return
        t0 = time.perf_counter()
        try:
            logits, b.states = self.model.step(nxt.astype(np.int32)[:, None], b.states)
        except Exception as exc:
            log.exception("decode step failed for a batch of %d on %s", len(b), self.model.name)
            for s in b.seqs:
                self._finish(s, "error", f"model error during decoding ({type(exc).__name__})")
            b.filter(np.zeros(0, np.intp))
            return
        b.logits = logits[:, -1, :]
        if self.observer:
            self.observer.on_step(len(b), time.perf_counter() - t0)

    def _decode_graph(self, graphs: DecodeGraphs) -> None:
        """One decode-graph call: every row feeds its pending id and gains K sampled ids.

        A row holds the id it feeds next (`pending`, already emitted) and the state before it.
        Rows just out of prefill sample their first id from their logits on the host first.
        While seeds prefill, the K = 1 graph runs, so a seed advances one slice per character
        as with host sampling; both graphs sample alike, so the text does not depend on it."""
        b = self.batch
        if b.fresh_rows:
            self._start_rows()
            if not len(b):
                return
        graph: DecodeGraph = graphs.single if self.prefilling and graphs.single else graphs.steps
        k = graph.steps
        base, fed, states_in = b.counters.copy(), b.pending.copy(), b.states
        t0 = time.perf_counter()
        try:
            out = graph.run(fed, self.model.states_to_host(states_in), b.temperature, b.top_k,
                            b.top_p, block_uniforms(b.keys, base, k),
                            details=bool(b.detail_rows))
        except Exception as exc:  # onnxruntime errors are not a fixed type
            log.exception("decode graph call failed for a batch of %d on %s", len(b),
                          self.model.name)
            for s in b.seqs:
                self._finish(s, "error", f"model error during decoding ({type(exc).__name__})")
            b.filter(np.zeros(0, np.intp))
            return
        if self.observer:
            self.observer.on_step(len(b), time.perf_counter() - t0)
        self._last_k = k
        b.states = self.model.states_from_host(out.states)
        b.pending = out.ids[:, -1].copy()
        take = np.minimum(b.remaining, k)  # the last block of a row may be partly used
        b.counters += np.uint64(k)
        b.remaining -= take
        seqs, blocks, counts = b.seqs, out.ids.tolist(), take.tolist()
        ended: dict[int, tuple[str, int]] = {}  # row -> (reason, ids of the block used)
        # Stop rows first (where a stop ends the block), then details, then ids: a reader on
        # another thread that sees an id must also see its detail (the host path's order).
        emitted: dict[int, list[int]] = {}
        for i in b.stop_rows:
            s, out_ids = seqs[i], []
            for j, tok in enumerate(blocks[i][:counts[i]]):
                emit, stopped = s.matcher.push(tok)
                out_ids.extend(emit)
                if stopped:
                    ended[i] = ("stop", j + 1)
                    break
            emitted[i] = out_ids
        if b.detail_rows:
            assert out.chosen_prob is not None
            assert out.top_ids is not None
            assert out.top_probs is not None
            for i in b.detail_rows:
                used = ended[i][1] if i in ended else counts[i]
                for j in range(used):
                    seqs[i].details.append(TokenDetail(
                        prob=float(out.chosen_prob[i, j]),
                        top=list(zip(out.top_ids[i, j].tolist(),
                                     out.top_probs[i, j].tolist(), strict=True))))
        for i, (s, block, n) in enumerate(zip(seqs, blocks, counts, strict=True)):
            if i in emitted:
                s.ids.extend(emitted[i])
            else:
                s.ids.extend(block if n == k else block[:n])
        self.touched.extend(seqs)
        for i in np.flatnonzero(b.remaining <= 0).tolist():
            ended.setdefault(i, ("length", counts[i]))
        for i in np.flatnonzero(time.perf_counter() >= b.deadline).tolist():
            ended.setdefault(i, ("time_limit", counts[i]))
        if not ended:
            return
        for i, (reason, n) in ended.items():
            # The state before the row's last id: the call's own when the block's last id
            # ended it, else the block's first n inputs replayed from where the call started.
            before_last = (partial(self._row_states, b.states, i) if n == k else
                           partial(self._replay, states_in, i, [int(fed[i]), *blocks[i][:n - 1]]))
            self._end_row(i, reason, int(base[i]) + n, blocks[i][n - 1], before_last)
        self._drop_rows(set(ended))

    def _start_rows(self) -> None:
        """Graph mode: rows just out of prefill (or the state cache) sample their first id from
        their logits on the host, which becomes the id they feed next."""
        b = self.batch
        fresh = np.array(b.fresh_rows, np.intp)
        b.fresh_rows = []
        u = rng_mod.uniforms(b.keys[fresh], b.counters[fresh])
        first = sample_next(b.logits[fresh], b.temperature[fresh], b.top_k[fresh],
                            b.top_p[fresh], u)
        b.pending[fresh] = first
        if b.detail_rows:
            joined = set(fresh.tolist())
            self._record_details(b.pending, [i for i in b.detail_rows if i in joined])
        b.counters[fresh] += np.uint64(1)
        b.remaining[fresh] -= 1
        now = time.perf_counter()
        ended: dict[int, str] = {}
        for i, tok in zip(fresh.tolist(), first.tolist(), strict=True):
            s = b.seqs[i]
            s.first_at = now
            self.touched.append(s)
            if i in b.stop_rows:
                emit, stopped = s.matcher.push(tok)
                s.ids.extend(emit)
                if stopped:
                    ended[i] = "stop"
                    continue
            else:
                s.ids.append(tok)
            if b.remaining[i] <= 0:
                ended[i] = "length"
            elif now >= b.deadline[i]:
                ended[i] = "time_limit"
        if ended:
            for i, reason in ended.items():
                self._end_row(i, reason, int(b.counters[i]), int(b.pending[i]),
                              partial(self._row_states, b.states, i))
            self._drop_rows(set(ended))

    def _row_states(self, states: Any, i: int) -> Any:
        return self.model.select(states, np.array([i], np.intp))

    def _replay(self, states: Any, i: int, ids: list[int]) -> Any:
        """Row i's state after feeding `ids` from `states`."""
        return self.model.step(np.array([ids], np.int32), self._row_states(states, i))[1]

    def _end_row(self, i: int, reason: str, sampled: int, last: int,
                 before_last: Callable[[], Any]) -> None:
        """Finish batch row i. A resumable row ending by length or time keeps what continuing
        it exactly needs: the state before its last id (`before_last()`), that id, and how
        many ids its random stream has given."""
        s = self.batch.seqs[i]
        s.sampled = sampled
        if reason in ("length", "time_limit"):
            if s.params.resumable:
                try:
                    s.final = (self.model.states_to_host(before_last()), last, sampled)
                except Exception:  # a replay's graph error: it ends without a handle
                    log.exception("could not keep the final state of a resumable request "
                                  "on %s", self.model.name)
            s.ids.extend(s.matcher.flush())
        self._finish(s, reason)

    def _drop_rows(self, rows: set[int]) -> npt.NDArray[np.intp]:
        keep = np.array([i for i in range(len(self.batch)) if i not in rows], np.intp)
        self.batch.filter(keep)
        return keep

    def _record_details(self, nxt: npt.NDArray[np.integer], rows: list[int]) -> None:
        b = self.batch
        probs = softmax(b.logits[rows])  # (R, V), the model's own distribution (T = 1)
        top = np.argsort(-probs, axis=-1)[:, :TOP_ALTERNATIVES]
        for j, i in enumerate(rows):
            tok = int(nxt[i])
            b.seqs[i].details.append(TokenDetail(
                prob=float(probs[j, tok]),
                top=[(int(t), float(probs[j, t])) for t in top[j]],
            ))

    def _finish(self, s: Sequence, reason: str, error: str | None = None) -> None:
        if s.done:
            return
        s.error = error
        s.finished_at = time.perf_counter()
        s.finish_reason = reason  # last: readers that see it see everything else
        self.touched.append(s)
        if self.observer:
            self.observer.on_finish(s)

    def recover(self) -> None:
        """After an unexpected error in an iteration (a bug, not a model error: those fail
        their rows inside the core), from either driver: no row's state can be trusted, so
        fail them all and keep serving. Call from the `except` block: it logs the traceback."""
        log.exception("engine iteration failed on %s", self.model.name)
        for s in [*self.waiting, *self.prefilling, *self.batch.seqs]:
            self._finish(s, "error", "internal engine error")
        self.waiting.clear()
        self.prefilling.clear()
        self.batch = Batch(self.model)
        self.publish()
