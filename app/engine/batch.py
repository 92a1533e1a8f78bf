"""One generation as the engine sees it (`Sequence`), and the rows decoding together (`Batch`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from app import rng as rng_mod
from app.engine.messages import (
    MAX_BIAS,
    Constraint,
    Detail,
    Final,
    GenerationRequest,
    TopLogprobs,
)
from app.stops import StopMatcher


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


class DfaTables:
    """A compiled constraint as arrays (app/constraints.py), shared by every row using it."""

    def __init__(self, c: Constraint) -> None:
        self.table = np.frombuffer(c.table, np.int32).reshape(c.states, c.vocab)  # (S, V)
        self.dist = np.frombuffer(c.dist, np.int32)  # (S,): characters to acceptance
        moves = (self.table >= 0).any(axis=1)
        self.final = np.frombuffer(c.accepting, np.uint8).astype(bool) & ~moves  # (S,)

    def allowed(self, states: npt.NDArray[np.intp], remaining: npt.NDArray[np.int64]
                ) -> npt.NDArray[np.bool_]:
        """(R, V) for rows in `states` with `remaining` characters to go (this one included):
        the ids leading to a state from which acceptance is reachable in the characters left
        after this one, so the text always completes. A row with too few characters left (the
        service refuses such requests up front) gets every live move and ends by length."""
        nxt = self.table[states]  # (R, V)
        live = nxt >= 0
        ok = live & (self.dist[np.maximum(nxt, 0)] <= (remaining - 1)[:, None])
        short = ~ok.any(axis=1)
        if short.any():
            ok[short] = live[short]
        return ok


class RowConstraint:
    """A row's constraint and where its text stands in it."""

    def __init__(self, tables: DfaTables) -> None:
        self.tables = tables
        self.state = 0

    @property
    def done(self) -> bool:
        """Accepting with no way on: the text is complete."""
        return bool(self.tables.final[self.state])


def bias_vector(pairs: tuple[tuple[int, float], ...], vocab: int) -> npt.NDArray[np.float32]:
    """(V,) additive logit bias; -100 bans (-inf), as OpenAI's logit_bias."""
    bias = np.zeros(vocab, np.float32)
    for i, b in pairs:
        bias[i] = -np.inf if b <= -MAX_BIAS else b
    return bias


class Sequence:
    """One request from submission to finish: what it emitted, where its prefill stands, and
    what its reader has been sent (app/engine/loop.py)."""

    def __init__(self, req: GenerationRequest, client: bytes = b"") -> None:
        self.req = req
        self.client = client  # which engine client to send its events to
        self.seed = np.asarray(req.seed_ids, np.int32)  # (T,)
        self.ids: list[int] = []  # emitted (safe) ids, never part of a stop sequence
        self.details: list[Detail] = []  # one per emitted id, with `details`
        self.sampled = 0
        self.finish_reason: str | None = None  # length | stop | time_limit | cancelled | error
        self.error: str | None = None
        self.cancelled = False
        self.abort_error: str | None = None  # with cancelled: end as "error" with this
        self.submitted_at = req.submitted_at or time.perf_counter()
        self.admitted_at: float | None = None
        self.first_at: float | None = None
        self.finished_at: float | None = None
        self.prefill_s = 0.0
        self.matcher: StopMatcher[int] = StopMatcher(req.stop, req.sampling.min_tokens)
        # Prefill progress: seed ids consumed so far and the state after them.
        self.prefilled = 0
        self.states: Any = None
        self.digests: dict[int, bytes] = {}  # state-cache keys of the seed's prefixes
        self.final: Final | None = None  # resumable, ended by length or time
        self.sent = 0  # ids already sent to the reader
        # Shaping of the next-id distribution (host sampling only): a constraint's DFA and an
        # additive bias, set when the row joins the batch (the vocabulary size is known then).
        self.dfa: RowConstraint | None = None
        self.bias: npt.NDArray[np.float32] | None = None
        self.finish_sent = False
        # Scoring (req.score): log p of seed positions start.. as prefill reaches them.
        self.score_lp: list[float] = []
        self.score_top: list[TopLogprobs] = []
        self.scored_sent = False
        # n > 1: this sequence prefills, then hands its state to n choices (`children`),
        # each a Sequence of its own with `index` and this one as `parent`.
        self.index = 0
        self.parent: Sequence | None = None
        self.children: list[Sequence] = []


    def shape_with(self, vocab: int, tables: Callable[[Constraint], DfaTables]) -> None:
        """Set the row's constraint (its arrays from `tables`, shared by equal constraints)
        and bias; ValueError unless they fit a vocabulary of `vocab` ids."""
        c = self.req.constraint
        if c is not None:
            if c.vocab != vocab:
                raise ValueError(f"constraint compiled for {c.vocab} ids, the model has {vocab}")
            self.dfa = RowConstraint(tables(c))
        pairs = self.req.sampling.logit_bias
        if any(i >= vocab for i, _ in pairs):
            raise ValueError(f"logit_bias id out of range for a vocabulary of {vocab}")
        if pairs:
            self.bias = bias_vector(pairs, vocab)

    @property
    def rows(self) -> int:
        """Batch rows this request takes once decoding."""
        return self.req.n

    def cancel(self, error: str | None = None) -> None:
        """Flag this sequence and its choices for cancellation (an abort when `error`)."""
        for s in (self, *self.children):
            s.cancelled = True
            if error is not None:
                s.abort_error = error

    @property
    def family_done(self) -> bool:
        """The request is over: it finished before fanning out, or every choice has."""
        if self.children:
            return all(c.done for c in self.children)
        return self.done

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def deadline(self) -> float:
        # The time limit runs from submission, so time spent queued counts against it.
        return self.submitted_at + self.req.time_limit_s


class Batch:
    """Rows in decode and their per-row parameters, appended and filtered together."""

    ARRAYS = ("logits", "temperature", "top_k", "top_p", "keys", "counters", "remaining",
              "deadline", "pending")

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
        # Rows whose distribution is shaped (constraint, logit_bias): sampled on the host.
        self.shaped_rows: list[int] = []
        self.dfa_rows: frozenset[int] = frozenset()
        # With a decode graph: True while rows hold a pending id (graph form), False while
        # their `logits` are current (host form, while shaped rows are in the batch).
        self.graph_form = False

    def __len__(self) -> int:
        return len(self.seqs)

    def append(self, seqs: list[Sequence], logits: npt.NDArray[np.float32], states: Any) -> None:
        """Rows whose prefill just finished join. Every array is built before any is
        assigned, so a failure leaves the batch as it was."""
        p = [s.req.sampling for s in seqs]
        new = {
            "logits": logits if not self.seqs else np.concatenate([self.logits, logits]),
            "states": self.model.concat([self.states, states]),
            "temperature": np.concatenate([self.temperature, np.array(
                [x.temperature for x in p], np.float32)]),
            "top_k": np.concatenate([self.top_k, np.array([x.top_k for x in p], np.int64)]),
            # float64: a top_p of 1e-50 must stay above 0 (it keeps only the likeliest id).
            "top_p": np.concatenate([self.top_p, np.array([x.top_p for x in p], np.float64)]),
            "keys": np.concatenate([self.keys, rng_mod.row_keys([x.seed for x in p])]),
            "counters": np.concatenate([self.counters, np.array(
                [s.req.counter_start for s in seqs], np.uint64)]),
            "remaining": np.concatenate([self.remaining, np.array(
                [s.req.max_new for s in seqs], np.int64)]),
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
        self.detail_rows = [i for i, s in enumerate(self.seqs) if s.req.details]
        self.shaped_rows = [i for i, s in enumerate(self.seqs)
                            if s.dfa is not None or s.bias is not None
                            or s.req.sampling.min_p > 0]
        self.dfa_rows = frozenset(i for i in self.shaped_rows if self.seqs[i].dfa is not None)

    def filter(self, rows: npt.NDArray[np.intp]) -> None:
        """Keep only `rows`, in that order: finished rows leave after a step."""
        self.seqs = [self.seqs[i] for i in rows]
        self.states = (self.model.select(self.states, rows) if len(rows)
                       else self.model.zero_states(0))
        for name in self.ARRAYS:
            setattr(self, name, getattr(self, name)[rows])
        self.fresh_rows = []  # filter() runs only after a step, which consumed them
        self._index_rows()

    def row_states(self, i: int, states: Any = None) -> Any:
        """Row i's state (of `states`, by default the batch's own)."""
        return self.model.select(self.states if states is None else states,
                                 np.array([i], np.intp))
