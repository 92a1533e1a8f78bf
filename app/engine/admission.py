"""Admission by predicted wait: how long a request sent now would wait for a batch row, and
whether to refuse it (429 with Retry-After) rather than let it wait past CHARLSTM_MAX_WAIT_S.

The prediction simulates the queue over the rows' remaining work in iterations, with an
iteration's cost measured at start (`calibrate`) and corrected by the live iteration period.
With API keys the queue is fair (app/engine/fairness.py): a newcomer's prediction counts only
the requests fair queuing would serve before it (its own key's, and the others' up to their
share), so one key's flood raises that key's predicted wait, not everyone's. A key over its
characters-per-minute budget is refused first, with Retry-After from its budget.
Each refusal is judged afterwards against what the queue really did (a "false" refusal: a row
came within the bound), which /metrics reports.
"""

from __future__ import annotations

import heapq
import logging
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from app import rng as rng_mod
from app.decode import DecodeGraph, block_uniforms
from app.engine.messages import GenerationRequest
from app.sampling import sample_next

if TYPE_CHECKING:
    from app.engine.core import EngineCore

log = logging.getLogger(__name__)


@dataclass
class _Refusal:
    """A request refused for its predicted wait, judged once the queue shows the truth."""

    at: float
    ahead: int  # admissions still to come before the one that would have been its row
    run_s: float  # how long it would have held that row (predicted at refusal)


@dataclass
class Decision:
    wait_s: float  # predicted wait for a row
    refusal: str | None = None  # None: admitted
    retry_after: int = 0
    cause: str = ""  # of a refusal: budget | capacity | wait | time_limit


def _pop(frees: list[float]) -> float:
    """The next row to free; inf when none is left to this request (the rest are kept free
    for other keys, app/engine/fairness.py)."""
    return heapq.heappop(frees) if frees else math.inf


class AdmissionPolicy:
    """The core's queue, rows and timings, read to decide admissions; single-threaded."""

    # Timing history for the predictions: medians of the last N, so one slow call (the
    # first after idle, a noisy neighbour) does not turn into refusals.
    HISTORY = 32
    # The gate is soft: it refuses only what the estimate puts this far past the bound, so
    # an estimate up to 25% pessimistic (this machine's speed swings) refuses nobody who
    # would have been served within it. Measured: with the gate at the bound itself, retries
    # come back just as the predicted wait reaches it, and 40-100% of refusals were false.
    REFUSE_PAST = 1.25

    def __init__(self, core: EngineCore, max_queue: int, max_wait_s: float) -> None:
        self.core = core
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
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
        self._last_k = core.chars_per_call  # of the last decode call (K = 1 while prefilling)
        # Seconds spent judging submissions since the last decode: a burst of hundreds of
        # them lengthens one period once, and must not read as every iteration being slow.
        self._judging_s = 0.0
        self._prefill_rates: deque[float] = deque(maxlen=self.HISTORY)  # s per seed char
        self.prefill_s_per_char = 0.0  # median prefill cost per seed character, seconds
        self.chars_per_s = 0.0  # characters delivered per second at the last batch size
        # Refusals awaiting a verdict (bounded: a sample is enough for a rate).
        self._refusals: list[_Refusal] = []
        self._virtual_rows: list[float] = []  # when rows given to refused requests free
        self.false_refusals = 0
        self.justified_refusals = 0

    # --- timing model -------------------------------------------------------------------------
    @property
    def iteration_s(self) -> float:
        """Predicted seconds per iteration with every row busy (when anyone waits, they are)."""
        return self.factor * (self.step_fixed_s + self.step_row_s * self.core.max_batch)

    @property
    def prefill_iteration_s(self) -> float:
        """The same for an iteration that also prefills (its decode call is the K = 1 one)."""
        return self.factor * (self.single_fixed_s + self.single_row_s * self.core.max_batch)

    def calls(self, chars: int | npt.NDArray[np.int64]) -> Any:
        """Decode calls until a row has `chars` more characters (K per call)."""
        return -(-chars // self.core.chars_per_call)

    def prefill_iterations(self, seed_chars: int) -> int:
        return -(-seed_chars // self.core.prefill_chunk_chars)

    def calibrate(self, repeats: int = 3) -> None:
        """Time a decode iteration (graph call, random draws, sampling) at 1 and `max_batch`
        rows, so the first burst is judged at full-batch speed, not at an empty batch's."""
        model, max_batch, decode = self.core.model, self.core.max_batch, self.core.decode

        def timed(rows: int, graph: DecodeGraph | None) -> float:
            ids = np.zeros((rows, 1), np.int32)
            states = model.zero_states(rows)
            keys, counters = rng_mod.row_keys(np.arange(rows)), np.zeros(rows, np.uint64)
            temperature = np.ones(rows, np.float32)
            top_k, top_p = np.zeros(rows, np.int64), np.ones(rows, np.float64)
            times = []
            for _ in range(repeats + 1):  # the first call allocates: not counted
                t0 = time.perf_counter()
                if graph is not None:
                    graph.run(ids[:, 0], model.states_to_host(states), temperature, top_k,
                              top_p, block_uniforms(keys, counters, graph.steps),
                              details=False).ids.tolist()
                else:
                    logits, _ = model.step(ids, states)
                    u = rng_mod.uniforms(keys, counters)
                    sample_next(logits[:, -1, :], temperature, top_k, top_p, u).tolist()
                times.append(time.perf_counter() - t0)
            return statistics.median(times[1:])

        def fit(graph: DecodeGraph | None) -> tuple[float, float]:
            one = timed(1, graph)
            full = timed(max_batch, graph) if max_batch > 1 else one
            row = max(full - one, 0.0) / max(max_batch - 1, 1)
            return max(one - row, 1e-6), row

        self.step_fixed_s, self.step_row_s = fit(decode.steps if decode else None)
        single = decode.single if decode else None
        self.single_fixed_s, self.single_row_s = (fit(single) if single is not None else
                                                  (self.step_fixed_s, self.step_row_s))

    def on_decode(self, rows: int, k_next: int) -> None:
        """Before a decode call at `rows` rows: the period since the last one, measured
        against the call it made, corrects the timing model."""
        now = time.perf_counter()
        if self._last_decode_at is not None:
            period = max(now - self._last_decode_at - self._judging_s, 1e-6)
            single = self._last_k == 1 < self.core.chars_per_call
            expected = (self.single_fixed_s + self.single_row_s * rows if single
                        else self.step_fixed_s + self.step_row_s * rows)
            self._ratios.append(period / expected)
            self.factor = max(statistics.median(self._ratios), 0.1)
            self.chars_per_s = rows * self._last_k / period
        self._last_decode_at = now
        self._judging_s = 0.0
        self._last_k = k_next

    def on_idle(self) -> None:
        self._last_decode_at = None  # idle gaps are not iteration time

    def on_prefill(self, seconds: float, chars: int) -> None:
        self._prefill_rates.append(seconds / chars)
        self.prefill_s_per_char = statistics.median(self._prefill_rates)

    # --- predictions --------------------------------------------------------------------------
    def predict_wait(self, req: GenerationRequest | None = None) -> float:
        """Seconds until a request submitted now would get its rows (n for n choices; 0 when
        they are free): for `req`'s key when given, else for a one-row request behind
        everything queued.

        Simulates the queue over the rows' remaining work in iterations: every row frees
        after its remaining characters, each request ahead then holds the first rows to free
        for its prefill slices and its characters. Pessimistic where stops end rows early."""
        core = self.core
        rows = req.n if req is not None else 1
        ahead = core.waiting.ahead(req)
        free = core.waiting.rows_for(req, core.max_batch - core.active)
        if free >= sum(s.rows for s in ahead) + rows:
            return 0.0
        per_iter = self.iteration_s or 0.001
        per_prefill = self.prefill_iteration_s or 0.001
        now = time.perf_counter()
        # When each row frees, in seconds from now: after its remaining characters, or at
        # its time limit if that comes first.
        frees = [0.0] * max(free, 0)
        b = core.batch
        if len(b):
            frees += np.minimum(self.calls(b.remaining) * per_iter,
                                np.maximum(b.deadline - now, 0.0)).tolist()
        frees += [min(self.prefill_iterations(len(s.seed) - s.prefilled) * per_prefill
                      + self.calls(s.req.max_new) * per_iter, max(s.deadline - now, 0.0))
                  for s in core.prefilling for _ in range(s.rows)]
        # Queued seeds ahead of the newcomer will slow every iteration while they prefill
        # (prefill already under way is in the measured iteration period).
        prefill_chars = 0
        heapq.heapify(frees)
        for s in ahead:
            start = max(_pop(frees) for _ in range(s.rows))
            run = self.predict_run(s.req)
            for _ in range(s.rows):
                heapq.heappush(frees, start + min(run, max(s.deadline - now - start, 0.0)))
            prefill_chars += len(s.seed)
        for _ in range(rows - 1):
            _pop(frees)
        return (frees[0] if frees else math.inf) + prefill_chars * self.prefill_s_per_char

    def predict_run(self, req: GenerationRequest) -> float:
        """Seconds a request would take once it holds a row, at the current iteration time."""
        return float(self.prefill_iterations(len(req.seed_ids))
                     * (self.prefill_iteration_s or 0.001)
                     + self.calls(req.max_new) * (self.iteration_s or 0.001))

    # --- decisions ----------------------------------------------------------------------------
    def decide(self, req: GenerationRequest) -> Decision:
        """Admit or refuse a request now."""
        t0 = time.perf_counter()
        try:
            return self._decide(req)
        finally:
            self._judging_s += time.perf_counter() - t0

    def _decide(self, req: GenerationRequest) -> Decision:
        decision = self._judge_request(req)
        if decision.refusal is not None and self.core.observer is not None:
            self.core.observer.on_key_refused(self.core.waiting.name(req), decision.cause)
        return decision

    def _judge_request(self, req: GenerationRequest) -> Decision:
        core = self.core
        name = core.model.name
        over = core.waiting.budget_wait(req)
        if over is not None:
            seconds, budget = over
            return Decision(0.0, f"API key {core.waiting.name(req)!r} is over its budget of "
                                 f"{budget} characters per minute on model {name!r} (this "
                                 f"request costs {len(req.seed_ids) + req.max_new}: seed plus "
                                 "max_new_chars)", max(1, min(3600, math.ceil(seconds))),
                            "budget")
        # Queued beyond the free rows: a burst decided in one go is admitted into free rows
        # at the same iteration, so those do not count against the queue.
        if core.waiting.over_capacity(req, self.max_queue, core.max_batch - core.active):
            wait = self.predict_wait(req)
            return Decision(wait, f"model {name!r} is at capacity ({len(core.waiting)} "
                                  f"requests waiting)", self._retry_after(wait), "capacity")
        wait = self.predict_wait(req)
        if wait > self.max_wait_s * self.REFUSE_PAST:
            if len(self._refusals) < 256:
                # In the queue it would have stood behind the requests served before it and
                # behind the requests refused before it (each of those needs a row first).
                self._refusals.append(_Refusal(time.perf_counter(),
                                               len(core.waiting.ahead(req))
                                               + len(self._refusals),
                                               self.predict_run(req)))
            return Decision(wait, f"model {name!r} is overloaded: a new request would wait "
                                  f"about {wait:.1f} s for a row (limit {self.max_wait_s:g} s)",
                            self._retry_after(wait), "wait")
        limit = req.time_limit_s
        if wait > 0:
            log.debug("admit %s: predicted wait %.3f s (iteration %.2f ms x factor %.2f), "
                      "%d rows, %d waiting", name, wait, self.iteration_s * 1e3,
                      self.factor, core.active, len(core.waiting))
        if wait > 0 and wait + self.predict_run(req) > limit:
            target = max(limit - self.predict_run(req), 0.0)
            return Decision(wait, f"model {name!r} cannot finish this request within its time "
                                  f"limit of {limit:g} s now (about {wait:.1f} s of queue "
                                  "ahead)", self._retry_after(wait, target=target), "time_limit")
        return Decision(wait)

    def _retry_after(self, wait: float, target: float | None = None) -> int:
        # Without new arrivals the predicted wait falls one second per second; retrying once
        # it has fallen under the bound gets served.
        target = self.max_wait_s if target is None else min(target, self.max_wait_s)
        return max(1, min(3600, math.ceil(wait - target)))

    # --- verdicts on refusals -------------------------------------------------------------------
    def on_admitted(self, now: float) -> None:
        """A queued request got its row: the refused ones move up the line."""
        if self._refusals:
            self._judge(now, all_=False)

    def on_rows_free(self, now: float) -> None:
        """The queue is empty and rows are free: they go to the refused, one each."""
        if self._refusals and not self.core.waiting and self.core.active < self.core.max_batch:
            self._judge(now, all_=True)

    def _judge(self, now: float, all_: bool) -> None:
        """A refused request would have taken the row of the (ahead + 1)-th admission after
        it (FIFO), or the first free row once the queue emptied: a false refusal if that came
        within the bound. Run once per admission, or with all_ when rows are free."""
        still = []
        # Once the queue is empty, free rows go to the refused in order; a row given to one
        # stays taken (virtually) for its predicted run, so each free row serves one of them.
        while self._virtual_rows and self._virtual_rows[0] <= now:
            heapq.heappop(self._virtual_rows)
        free = (self.core.max_batch - self.core.active - len(self._virtual_rows)
                if all_ else 0)
        judged = 0
        observer = self.core.observer
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
                if observer:
                    observer.on_refusal_verdict(false)
            else:
                r.ahead = max(r.ahead - (judged if all_ else 1), 0)
                still.append(r)
        self._refusals = still
