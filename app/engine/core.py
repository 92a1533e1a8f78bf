"""The decode loop for one model, with no threads, no event loop and no I/O.

The engine loop (app/engine/loop.py) feeds it sequences and calls `iterate()` while there is
work. An iteration reads like the work:

    admit    free rows go to queued sequences (whole seeds found in the state cache join the
             batch at once); admission by predicted wait happened before (app/engine/admission.py)
    prefill  seeds run through the graph in slices of at most `prefill_chunk_chars` characters
             per iteration, shared by every sequence in prefill, so a long seed never stalls the
             running rows for longer than one slice
    decode   every row gains one id (host sampling, app/sampling.py) or K ids (a decode graph
             samples them inside onnxruntime, app/decode.py)
    emit     the new ids pass the rows' stop matchers; rows that end (length, stop, time limit)
             leave the batch, a resumable one keeping its final state

Whatever one sequence does wrong (parameters the arrays cannot hold, a graph error in its
prefill) fails that sequence alone; a failing decode step fails the rows in that step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from app import rng as rng_mod
from app.continuation import states_from_bytes, states_to_bytes
from app.decode import DecodeGraph, DecodeGraphs, block_uniforms
from app.engine.admission import AdmissionPolicy, Decision
from app.engine.batch import Batch, Sequence, StepModel
from app.engine.cache import StateCache, prefix_digests
from app.engine.fairness import FairQueue
from app.engine.messages import TOP_ALTERNATIVES, Detail, Final, GenerationRequest
from app.sampling import sample_next, softmax
from app.tenants import TenantSpec

log = logging.getLogger(__name__)


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

    # --- queries --------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Rows held: decoding or in prefill."""
        return len(self.batch) + len(self.prefilling)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.batch.seqs)

    @property
    def graph_files(self) -> str:
        """What decodes: the step graph, and the decode graph when one samples in the graph."""
        step = str(getattr(self.model, "graph_file", "model.onnx"))
        return f"{step} + {self.decode.files}" if self.decode else step

    def admission(self, req: GenerationRequest) -> Decision:
        return self.policy.decide(req)

    # --- submission -----------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; parameters that do not fit fail it at once (it never queues)."""
        try:
            seq.req.check()
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
            if self.decode is not None:
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
        while self.waiting and self.active + len(whole_hits) < self.max_batch:
            s = self.waiting.pop(self.max_batch - self.active - len(whole_hits))
            if s is None:  # the free rows are kept for keys that hold none
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
        length, entry = self.cache.lookup(s.digests)
        if self.observer:
            self.observer.on_cache(entry is not None, length, self.cache.bytes,
                                   len(self.cache.entries))
        if entry is None:
            return None
        s.states, s.prefilled = entry.states, length
        return entry.logits if length == len(s.seed) else None

    def _join(self, seqs: list[Sequence], logits: npt.NDArray[np.float32], states: Any) -> None:
        try:
            self.batch.append(seqs, logits, states)
        except Exception as exc:
            log.exception("could not add %d row(s) to the batch on %s", len(seqs),
                          self.model.name)
            for s in seqs:
                self._finish(s, "error", f"could not start decoding ({type(exc).__name__})")

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
        self.policy.on_decode(len(b), 1)
        nxt = self._sample_host(np.arange(len(b), dtype=np.intp))
        states = b.states
        ended = self._emit([[t] for t in nxt.tolist()], [1] * len(b), self._details_from(nxt),
                           lambda i, n: b.row_states(i, states))
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
                                        out.top_probs[i, j].tolist(), strict=True)))
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
        first = self._sample_host(fresh)
        b.pending[fresh] = first
        details = self._details_from(first, fresh)
        rows = fresh.tolist()
        ended = self._emit([[t] for t in first.tolist()], [1] * len(rows), details,
                           lambda i, n: b.row_states(i), rows=rows)
        if ended:
            self._drop_rows(ended)

    def _sample_host(self, rows: npt.NDArray[np.intp]) -> npt.NDArray[np.int64]:
        """Sample one id for each of `rows` from their logits, advancing their counters."""
        b = self.batch
        whole = len(rows) == len(b)

        def pick(a: Any) -> Any:
            return a if whole else a[rows]

        u = rng_mod.uniforms(pick(b.keys), pick(b.counters))
        nxt = sample_next(pick(b.logits), pick(b.temperature), pick(b.top_k), pick(b.top_p), u)
        if whole:
            b.counters += np.uint64(1)
            b.remaining -= 1
        else:
            b.counters[rows] += np.uint64(1)
            b.remaining[rows] -= 1
        return nxt

    def _details_from(self, chosen: npt.NDArray[np.integer],
                      rows: npt.NDArray[np.intp] | None = None) -> dict[int, list[Detail]]:
        """Host details for the detail rows among `rows` (all by default; chosen[j] is the id
        row rows[j] picked): the model's own distribution (temperature 1) and the top ids."""
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
            out[i] = [(float(probs[r, tok]), [(int(t), float(probs[r, t])) for t in top[r]])]
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
        rows = list(range(len(b))) if rows is None else rows
        seqs = b.seqs
        now = time.perf_counter()
        ended: dict[int, tuple[str, int, int]] = {}  # row -> (reason, ids used, j)
        for j, i in enumerate(rows):
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
        self.touched.append(s)
        if self.observer:
            self.observer.on_finish(s)
