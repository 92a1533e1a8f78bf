"""The decode loop for one model, with no threads, no event loop and no I/O.

The engine loop (app/engine/loop.py) feeds it sequences and calls `iterate()` while there is
work. An iteration reads like the work:

    admit    free rows go to queued sequences (whole seeds found in the state cache join the
             batch at once); admission by predicted wait happened before (app/engine/admission.py)
    prefill  seeds run through the graph in slices of at most `prefill_chunk_chars` characters
             per iteration, shared by every sequence in prefill, so a long seed never stalls the
             running rows for longer than one slice; a scoring request's seed is scored from
             the slices' logits on the way (app/engine/scoring.py)
    join     a prefilled seed joins the batch: as one row, or as n rows sharing its state
             (n choices), or not at all when it asked for no characters (max_new 0)
    decode   every row gains one id (host sampling, app/sampling.py) or K ids (a decode graph
             samples them inside onnxruntime, app/decode.py)
    emit     the new ids pass the rows' stop matchers; rows that end (length, stop, time limit)
             leave the batch, a resumable one keeping its final state

Whatever one sequence does wrong (parameters the arrays cannot hold, a graph error in its
prefill) fails that sequence alone; a failing decode step fails the rows in that step.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from app import rng as rng_mod
from app.continuation import states_from_bytes, states_to_bytes
from app.decode import DecodeGraph, DecodeGraphs, block_uniforms
from app.engine.admission import AdmissionPolicy, Decision
from app.engine.batch import Batch, DfaTables, Sequence, StepModel
from app.engine.cache import StateCache, prefix_digests
from app.engine.fairness import FairQueue
from app.engine.messages import (
    TOP_ALTERNATIVES,
    Constraint,
    Detail,
    Final,
    GenerationRequest,
    choice_seed,
)
from app.engine.scoring import score_positions
from app.sampling import sample_next, softmax
from app.tenants import TenantSpec

log = logging.getLogger(__name__)

DFA_TABLES_KEPT = 64  # distinct constraints whose arrays the engine keeps for reuse


class EngineObserver(Protocol):
    """Metrics hooks; the engine calls them from the thread or process that drives it."""

    def on_step(self, batch: int, seconds: float) -> None: ...
    def on_prefill(self, rows: int, chars: int, seconds: float) -> None: ...
    def on_queue(self, waiting: int, active: int) -> None: ...
    def on_finish(self, seq: Sequence) -> None: ...
    def on_refusal_verdict(self, false: bool) -> None: ...
    def on_estimate(self, wait_s: float, chars_per_s: float) -> None: ...
    def on_cache(self, hit: bool, chars_saved: int, size_bytes: int, entries: int) -> None: ...
    def on_limits(self, max_batch: int, cache_bytes: int) -> None: ...
    # Per API key (its name, never the key): app/engine/fairness.py
    def on_key(self, key: str, queued: int, rows: int) -> None: ...
    def on_key_finish(self, key: str, outcome: str, seed_chars: int, generated: int) -> None: ...
    def on_key_refused(self, key: str, cause: str) -> None: ...


# A decode step's result, per row of the batch: the ids it sampled, how many of them count
# (the last block of a row may be cut by its remaining characters), their details (rows with
# `details` only), and the state before the n-th id of row i (for resumable rows that end).
BeforeLast = Callable[[int, int], Any]


class EngineCore:
    """Continuous batching for one model; single-threaded, driven by `iterate()`."""

    def __init__(self, model: StepModel, max_batch: int = 256, max_queue: int = 256,
                 prefill_chunk_chars: int = 256, max_wait_s: float = 10.0,
                 observer: EngineObserver | None = None, state_cache_bytes: int = 0,
                 decode: DecodeGraphs | None = None,
                 tenants: dict[bytes, TenantSpec] | None = None) -> None:
        self.model = model
        self.decode = decode
        # Characters each row gains per decode call: the predictions count in characters.
        self.chars_per_call = decode.steps.steps if decode else 1
        self.cache = StateCache(state_cache_bytes) if state_cache_bytes > 0 else None
        self.max_batch = max_batch
        self.prefill_chunk_chars = prefill_chunk_chars
        self.observer = observer
        # Queued requests, a FIFO per API key served by fair queuing (one FIFO without keys).
        self.waiting = FairQueue(tenants, max_batch, observer)
        if observer:
            observer.on_limits(max_batch, state_cache_bytes)
        self.prefilling: list[Sequence] = []  # hold a row, seed not yet fully consumed
        self.batch = Batch(model)
        self.policy = AdmissionPolicy(self, max_queue, max_wait_s)
        self.touched: list[Sequence] = []  # sequences with news since the loop last looked
        self._published: tuple[int, int] | None = None  # what publish() last reported
        # Constraint arrays by constraint (equal ones share theirs: one lookup per group of
        # rows at each step), the most recently used last.
        self.dfa_tables: OrderedDict[Constraint, DfaTables] = OrderedDict()

    # --- queries --------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Rows held: decoding, or in prefill (a request with n choices holds n)."""
        return len(self.batch) + sum(s.rows for s in self.prefilling)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.batch.seqs)

    @property
    def graph_files(self) -> str:
        """What decodes: the step graph, and the decode graph when one samples in the graph."""
        step = str(getattr(self.model, "graph_file", "model.onnx"))
        return f"{step} + {self.decode.files}" if self.decode else step

    def admission(self, req: GenerationRequest) -> Decision:
        self._check_rows(req)
        return self.policy.decide(req)

    def _check_rows(self, req: GenerationRequest) -> None:
        if req.n > self.max_batch:
            raise ValueError(f"n = {req.n} choices need more rows than this engine has "
                             f"({self.max_batch})")

    # --- submission -----------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; parameters that do not fit fail it at once (it never queues)."""
        try:
            seq.req.check()
            self._check_rows(seq.req)
            if seq.req.initial_states is not None:
                seq.states = self.model.states_from_host(states_from_bytes(
                    seq.req.initial_states))
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

    def recover(self) -> None:
        """After an unexpected error in an iteration (a bug, not a model error: those fail
        their rows inside the core): no row's state can be trusted, so fail them all and keep
        serving. Call from the `except` block: it logs the traceback."""
        log.exception("engine iteration failed on %s", self.model.name)
        for s in [*self.waiting, *self.prefilling, *self.batch.seqs]:
            self._finish(s, "error", "internal engine error")
        self.waiting.clear()
        self.prefilling.clear()
        self.batch = Batch(self.model)
        self.publish()

    # --- one iteration ----------------------------------------------------------------------
    def iterate(self) -> None:
        """Admit into free rows, advance prefill by one slice, then one decode step."""
        self._admit()
        if self.prefilling:
            self._prefill_slice()
        if self.batch.seqs:
            # Shaped rows (constraint, logit_bias) need their logits on the host: while any is
            # in the batch, every row decodes there, one id per step (the decode graph samples
            # without masks). The same uniforms make the same ids either way.
            if self.decode is not None and not self.batch.shaped_rows:
                self._decode_graph(self.decode)
            else:
                self._decode_host()
        else:
            self.policy.on_idle()
        self.publish()

    # --- admit ------------------------------------------------------------------------------
    def _admit(self) -> None:
        now = time.perf_counter()
        whole_hits: list[tuple[Sequence, Any, npt.NDArray[np.float32]]] = []
        whole_rows = 0
        while self.waiting:
            s = self.waiting.pop(self.max_batch - self.active - whole_rows)
            if s is None:  # none fits, or the free rows are kept for keys that hold none
                break
            self.policy.on_admitted(now)
            s.admitted_at = now
            if s.cancelled:
                self._finish(s, "cancelled")
            elif now >= s.deadline:
                self._finish(s, "time_limit")
            elif s.states is not None:  # a continuation: no cache
                self.prefilling.append(s)
            elif self.cache is not None and (hit := self._from_cache(s)) is not None:
                whole_hits.append((s, s.states, hit))
                whole_rows += s.rows
                s.states = None
            else:
                self.prefilling.append(s)
        if whole_hits:
            # Seeds cached whole join the batch at once: no graph call at all.
            seqs = [h[0] for h in whole_hits]
            self._join(seqs, np.stack([h[2] for h in whole_hits]),
                       self.model.concat([h[1] for h in whole_hits]))
        self.policy.on_rows_free(now)

    def _from_cache(self, s: Sequence) -> npt.NDArray[np.float32] | None:
        """Start `s` from its longest cached prefix; its next-id logits when that is the
        whole seed (its state is then in s.states)."""
        assert self.cache is not None
        s.digests = prefix_digests(s.seed, self.prefill_chunk_chars, s.req.cache_scope)
        score = s.req.score
        # A cached prefix has no logits for its positions but the one after it: a scoring
        # request takes one only up to its first scored position (it still stores its own).
        usable = (s.digests if score is None else
                  {n: d for n, d in s.digests.items() if n <= score.start})
        length, entry = self.cache.lookup(usable)
        if self.observer:
            self.observer.on_cache(entry is not None, length, self.cache.bytes,
                                   len(self.cache.entries))
        if entry is None:
            return None
        s.states, s.prefilled = entry.states, length
        if score is not None and length == score.start < len(s.seed):
            self._score(s, entry.logits[None, :], length)
        return entry.logits if length == len(s.seed) else None

    def _join(self, seqs: list[Sequence], logits: npt.NDArray[np.float32], states: Any) -> None:
        """Prefilled seeds become batch rows: one each, n for a request with n choices (its
        state and logits copied), none for one that asked for no characters. A row whose
        constraint or bias does not fit the model fails alone."""
        rows: list[int] = []
        joining: list[Sequence] = []
        for j, s in enumerate(seqs):
            if s.scored_sent is False and s.req.score is not None:
                self.touched.append(s)  # its scores go out now
            if s.req.max_new == 0:
                self._finish(s, "length")
                continue
            if s.req.n == 1:
                candidates = [s]
            else:
                s.children = candidates = [self._choice(s, i) for i in range(s.req.n)]
            for c in candidates:
                try:
                    c.shape_with(logits.shape[-1], self._tables)
                except ValueError as exc:
                    self._finish(c, "error", f"invalid generation parameters: {exc}")
                    continue
                rows.append(j)
                joining.append(c)
        if not joining:
            return
        take = np.array(rows, np.intp)
        same = len(rows) == len(seqs) and rows == list(range(len(seqs)))
        try:
            self.batch.append(joining, logits if same else logits[take],
                              states if same else self.model.select(states, take))
        except Exception as exc:
            log.exception("could not add %d row(s) to the batch on %s", len(joining),
                          self.model.name)
            for s in joining:
                self._finish(s, "error", f"could not start decoding ({type(exc).__name__})")

    @staticmethod
    def _choice(parent: Sequence, index: int) -> Sequence:
        """Choice `index` of a request with n choices: its own row, stop matcher, counters
        and random stream (seeded choice_seed(seed, index), so it reproduces alone)."""
        req = parent.req
        seeded = msgspec.structs.replace(req.sampling,
                                         seed=choice_seed(req.sampling.seed, index))
        child = Sequence(msgspec.structs.replace(req, sampling=seeded, n=1, score=None),
                         parent.client)
        child.index, child.parent = index, parent
        child.submitted_at, child.admitted_at = parent.submitted_at, parent.admitted_at
        child.prefill_s = parent.prefill_s
        return child

    def _score(self, s: Sequence, logits: npt.NDArray[np.float32], first: int) -> None:
        """Score the seed positions that `logits` (T, V) predict: row r predicts seed
        position first + r; positions before the request's start or past the seed end are
        not the seed's to score."""
        score = s.req.score
        assert score is not None
        lo = max(first, score.start)
        hi = min(first + len(logits), len(s.seed))
        if hi <= lo:
            return
        lp, top = score_positions(logits[lo - first:hi - first], s.seed[lo:hi], score.top)
        s.score_lp += lp
        if top is not None:
            s.score_top += top

    # --- prefill ----------------------------------------------------------------------------
    def _prefill_slice(self) -> None:
        """Advance the sequences in prefill by at most `prefill_chunk_chars` characters in
        all, oldest first; equal slice lengths share one graph call (no padding needed)."""
        budget = self.prefill_chunk_chars
        by_len: dict[int, list[Sequence]] = {}
        for s in self.prefilling:
            if budget <= 0:
                break
            n = min(len(s.seed) - s.prefilled, budget)
            end = s.prefilled + n
            every = self.prefill_chunk_chars
            if self.cache is not None and end < len(s.seed) and end % every:
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
            ids = np.stack([s.seed[s.prefilled:s.prefilled + n] for s in group])  # (G, n)
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
        self.policy.on_prefill(seconds, int(ids.size))
        if self.observer:
            self.observer.on_prefill(len(group), int(ids.size), seconds)
        done: list[int] = []
        for j, s in enumerate(group):
            if s.req.score is not None:
                self._score(s, logits[j], s.prefilled + 1)
            s.prefilled += n
            s.prefill_s += seconds
            row = None
            if s.prefilled >= len(s.seed):
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
        self._join(joining, np.ascontiguousarray(logits[rows, -1, :]),
                   self.model.select(out, rows) if len(done) < len(group) else out)

    # --- decode -----------------------------------------------------------------------------
    def _decode_host(self) -> None:
        """One id per row, sampled on the host from the last logits, then one step-graph call
        advances the rows that go on."""
        b = self.batch
        if b.graph_form and not self._feed_pending():
            return
        self.policy.on_decode(len(b), 1)
        nxt, shaped = self._sample_host(np.arange(len(b), dtype=np.intp))
        states = b.states
        ended = self._emit([[t] for t in nxt.tolist()], [1] * len(b),
                           self._details_from(nxt, None, shaped),
                           lambda i, n: b.row_states(i, states))
        b.fresh_rows = []  # their first characters are out
        if ended:
            nxt = nxt[self._drop_rows(ended)]
        if not len(b):
            return
        t0 = time.perf_counter()
        try:
            logits, b.states = self.model.step(nxt.astype(np.int32)[:, None], b.states)
        except Exception as exc:
            self._fail_batch(exc)
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
        if not b.graph_form:  # from the host form: every row's next id is sampled from logits
            b.graph_form = True
            b.fresh_rows = list(range(len(b)))
        if b.fresh_rows:
            self._start_rows()
            if not len(b):
                return
        graph: DecodeGraph = graphs.single if self.prefilling and graphs.single else graphs.steps
        k = graph.steps
        self.policy.on_decode(len(b), k)
        base, fed, states_in = b.counters.copy(), b.pending.copy(), b.states
        t0 = time.perf_counter()
        try:
            out = graph.run(fed, self.model.states_to_host(states_in), b.temperature, b.top_k,
                            b.top_p, block_uniforms(b.keys, base, k),
                            details=bool(b.detail_rows))
        except Exception as exc:  # onnxruntime errors are not a fixed type
            self._fail_batch(exc)
            return
        if self.observer:
            self.observer.on_step(len(b), time.perf_counter() - t0)
        b.states = self.model.states_from_host(out.states)
        b.pending = out.ids[:, -1].copy()
        take = np.minimum(b.remaining, k)  # the last block of a row may be partly used
        b.counters += np.uint64(k)
        b.remaining -= take
        details: dict[int, list[Detail]] = {}
        if b.detail_rows:
            assert out.chosen_prob is not None
            assert out.top_ids is not None
            assert out.top_probs is not None
            for i in b.detail_rows:
                details[i] = [(float(out.chosen_prob[i, j]),
                               list(zip(out.top_ids[i, j].tolist(),
                                        out.top_probs[i, j].tolist(), strict=True)), None)
                              for j in range(int(take[i]))]
        blocks = out.ids.tolist()

        def before_last(i: int, n: int) -> Any:
            # The state before the row's n-th id: the call's own when the block's last id
            # ended it, else the block's first n inputs replayed from where the call started.
            if n == k:
                return b.row_states(i)
            ids = [int(fed[i]), *blocks[i][:n - 1]]
            return self.model.step(np.array([ids], np.int32), b.row_states(i, states_in))[1]

        ended = self._emit(blocks, take.tolist(), details, before_last, base=base)
        if ended:
            self._drop_rows(ended)

    def _start_rows(self) -> None:
        """Graph mode: rows just out of prefill (or the state cache) sample their first id from
        their logits on the host, which becomes the id they feed next."""
        b = self.batch
        fresh = np.array(b.fresh_rows, np.intp)
        b.fresh_rows = []
        first, shaped = self._sample_host(fresh)
        b.pending[fresh] = first
        details = self._details_from(first, fresh, shaped)
        rows = fresh.tolist()
        ended = self._emit([[t] for t in first.tolist()], [1] * len(rows), details,
                           lambda i, n: b.row_states(i), rows=rows)
        if ended:
            self._drop_rows(ended)

    def _feed_pending(self) -> bool:
        """From the graph form to the host form: rows just joined sample their first id, then
        one step-graph call feeds every row's pending id, so every row's logits are current.
        False when no row is left."""
        b = self.batch
        if b.fresh_rows:
            self._start_rows()
        b.graph_form = False
        if not len(b):
            return False
        try:
            logits, b.states = self.model.step(b.pending.astype(np.int32)[:, None], b.states)
        except Exception as exc:
            self._fail_batch(exc)
            return False
        b.logits = logits[:, -1, :]
        return True

    def _sample_host(self, rows: npt.NDArray[np.intp]
                     ) -> tuple[npt.NDArray[np.int64], dict[int, npt.NDArray[np.float32]]]:
        """Sample one id for each of `rows` from their logits, advancing their counters and
        their constraints. Also returns the shaped rows' logits (batch row -> (V,))."""
        b = self.batch
        whole = len(rows) == len(b)

        def pick(a: Any) -> Any:
            return a if whole else a[rows]

        u = rng_mod.uniforms(pick(b.keys), pick(b.counters))
        logits = pick(b.logits)
        shaped: dict[int, npt.NDArray[np.float32]] = {}
        if b.shaped_rows:
            logits, shaped = self._shape(logits, None if whole else rows)
        nxt = sample_next(logits, pick(b.temperature), pick(b.top_k), pick(b.top_p), u)
        if shaped:
            pos = None if whole else {i: j for j, i in enumerate(rows.tolist())}
            for tables, group in self._dfa_groups(list(shaped)).items():
                dfas = [b.seqs[i].dfa for i in group]
                states = tables.table[[d.state for d in dfas if d is not None],
                                      nxt[group if pos is None else [pos[i] for i in group]]]
                for d, state in zip(dfas, states.tolist(), strict=True):
                    if d is not None:
                        d.state = state
        if whole:
            b.counters += np.uint64(1)
            b.remaining -= 1
        else:
            b.counters[rows] += np.uint64(1)
            b.remaining[rows] -= 1
        return nxt, shaped

    def _shape(self, logits: npt.NDArray[np.float32], rows: npt.NDArray[np.intp] | None
               ) -> tuple[npt.NDArray[np.float32], dict[int, npt.NDArray[np.float32]]]:
        """A copy of `logits` (one row per batch row, or per `rows`) with each shaped row's
        logit_bias added and the ids its constraint does not allow at -inf: sampling then
        draws from the renormalised allowed distribution, temperature and filters included."""
        b = self.batch
        out = logits.copy()
        at = None if rows is None else {i: j for j, i in enumerate(rows.tolist())}
        pos: dict[int, int] = {}  # batch row -> row of `out`
        for i in b.shaped_rows:
            j = i if at is None else at.get(i)
            if j is not None:
                pos[i] = j
                bias = b.seqs[i].bias
                if bias is not None:
                    out[j] += bias
        for tables, group in self._dfa_groups(list(pos)).items():
            js = [pos[i] for i in group]
            states = np.array([d.state for i in group if (d := b.seqs[i].dfa) is not None],
                              np.intp)
            ok = tables.allowed(states, b.remaining[group])
            out[js] = np.where(ok, out[js], -np.inf)
        for i, j in pos.items():
            min_p = b.seqs[i].req.sampling.min_p
            if min_p > 0:
                # p / p_max < min_p after temperature T  <=>  logit < max + T log(min_p);
                # greedy rows (T = 0) keep only the likeliest anyway.
                t = max(float(b.temperature[i]), 1e-6)
                floor = out[j].max() + t * math.log(min_p)
                out[j] = np.where(out[j] < floor, -np.inf, out[j])
        return out, {i: out[j] for i, j in pos.items()}

    def _dfa_groups(self, rows: list[int]) -> dict[DfaTables, list[int]]:
        """Constrained batch rows among `rows`, grouped by the arrays they share."""
        groups: dict[DfaTables, list[int]] = {}
        for i in rows:
            dfa = self.batch.seqs[i].dfa
            if dfa is not None:
                groups.setdefault(dfa.tables, []).append(i)
        return groups

    def _tables(self, c: Constraint) -> DfaTables:
        tables = self.dfa_tables.get(c)
        if tables is None:
            tables = self.dfa_tables[c] = DfaTables(c)
            if len(self.dfa_tables) > DFA_TABLES_KEPT:
                self.dfa_tables.popitem(last=False)
        else:
            self.dfa_tables.move_to_end(c)
        return tables

    def _details_from(self, chosen: npt.NDArray[np.integer],
                      rows: npt.NDArray[np.intp] | None = None,
                      shaped: dict[int, npt.NDArray[np.float32]] | None = None
                      ) -> dict[int, list[Detail]]:
        """Host details for the detail rows among `rows` (all by default; chosen[j] is the id
        row rows[j] picked): the model's own distribution (temperature 1) and the top ids, and
        for shaped rows the probability after bias and mask (temperature 1)."""
        b = self.batch
        if not b.detail_rows:
            return {}
        pos = ({i: i for i in b.detail_rows} if rows is None else
               {i: j for j, i in enumerate(rows.tolist()) if i in set(b.detail_rows)})
        if not pos:
            return {}
        wanted = list(pos)
        probs = softmax(b.logits[wanted])  # (R, V)
        top = np.argsort(-probs, axis=-1)[:, :TOP_ALTERNATIVES]
        out: dict[int, list[Detail]] = {}
        for r, i in enumerate(wanted):
            tok = int(chosen[pos[i]])
            constrained = (float(softmax(shaped[i])[tok]) if shaped and i in shaped else None)
            out[i] = [(float(probs[r, tok]), [(int(t), float(probs[r, t])) for t in top[r]],
                       constrained)]
        return out

    # --- emit -------------------------------------------------------------------------------
    def _emit(self, blocks: list[list[int]], counts: list[int],
              details: dict[int, list[Detail]], before_last: BeforeLast,
              rows: list[int] | None = None,
              base: npt.NDArray[np.uint64] | None = None) -> set[int]:
        """Hand each row's new ids (blocks[j][:counts[j]] for row rows[j], every row by
        default) to its sequence through its stop matcher; end the rows that stopped, ran out
        of characters or time. Returns the rows that ended (still in the batch)."""
        b = self.batch
        seqs = b.seqs
        now = time.perf_counter()
        ended: dict[int, tuple[str, int, int]] = {}  # row -> (reason, ids used, j)
        rows_iter: list[int] = []
        if rows is None and not (b.stop_rows or b.dfa_rows or details):
            # Most iterations: every row of the batch, none with work of its own but its ids.
            # Rows new since the last step (host sampling) get their first-character time;
            # the decode graph's new rows got it in _start_rows.
            for s, block, n in zip(seqs, blocks, counts, strict=True):
                s.ids.extend(block if n == len(block) else block[:n])
            for i in b.fresh_rows:
                seqs[i].first_at = seqs[i].first_at or now
            rows = list(range(len(b)))
        else:
            rows = rows_iter = list(range(len(b))) if rows is None else rows
        for j, i in enumerate(rows_iter):
            s, n = seqs[i], counts[j]
            block = blocks[j] if n == len(blocks[j]) else blocks[j][:n]
            if s.first_at is None:
                s.first_at = now
            if i in b.stop_rows:
                for used, tok in enumerate(block, 1):
                    emit, stopped = s.matcher.push(tok)
                    s.ids.extend(emit)
                    if stopped:
                        ended[i] = ("stop", used, j)
                        break
            else:
                s.ids.extend(block)
            if i in b.dfa_rows and i not in ended and s.dfa is not None and s.dfa.done:
                # The constraint's text is complete: held-back characters are part of it.
                s.ids.extend(s.matcher.flush())
                ended[i] = ("stop", n, j)
            if i in details:
                s.details.extend(details[i][:ended[i][1] if i in ended else n])
        self.touched.extend(seqs[i] for i in rows)
        whole = len(rows) == len(b)
        remaining = b.remaining if whole else b.remaining[rows]
        for j in np.flatnonzero(remaining <= 0).tolist():
            ended.setdefault(rows[j], ("length", counts[j], j))
        deadline = b.deadline if whole else b.deadline[rows]
        for j in np.flatnonzero(now >= deadline).tolist():
            ended.setdefault(rows[j], ("time_limit", counts[j], j))
        for i, (reason, n, j) in ended.items():
            sampled = int(b.counters[i]) if base is None else int(base[i]) + n
            self._end_row(i, reason, sampled, blocks[j][n - 1],
                          lambda i=i, n=n: before_last(i, n))  # type: ignore[misc]
        return set(ended)

    def _end_row(self, i: int, reason: str, sampled: int, last: int,
                 before_last: Callable[[], Any]) -> None:
        """Finish batch row i. A resumable row ending by length or time keeps what continuing
        it exactly needs: the state before its last id (`before_last()`), that id, and how
        many ids its random stream has given."""
        s = self.batch.seqs[i]
        s.sampled = sampled
        if reason in ("length", "time_limit"):
            if s.req.resumable:
                try:
                    s.final = Final(states_to_bytes(self.model.states_to_host(before_last())),
                                    last, sampled)
                except Exception:  # a replay's graph error: it ends without a handle
                    log.exception("could not keep the final state of a resumable request "
                                  "on %s", self.model.name)
            s.ids.extend(s.matcher.flush())
        self._finish(s, reason)

    def _drop_rows(self, rows: set[int]) -> npt.NDArray[np.intp]:
        keep = np.array([i for i in range(len(self.batch)) if i not in rows], np.intp)
        self.batch.filter(keep)
        return keep

    def _fail_batch(self, exc: Exception) -> None:
        log.exception("decode step failed for a batch of %d on %s", len(self.batch),
                      self.model.name)
        for s in self.batch.seqs:
            self._finish(s, "error", f"model error during decoding ({type(exc).__name__})")
        self.batch.filter(np.zeros(0, np.intp))

    def _finish(self, s: Sequence, reason: str, error: str | None = None) -> None:
        if s.done:
            return
        s.error = error
        s.finished_at = time.perf_counter()
        s.finish_reason = reason
        self.waiting.finished(s)
        if s.parent is not None and s.parent.family_done:
            # n choices: the request queued (and its key's rows) ends with its last choice.
            self.waiting.finished(s.parent)
        self.touched.append(s)
        if self.observer:
            self.observer.on_finish(s)
