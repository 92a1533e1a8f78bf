"""The one request type and the one family of events of the engine, as msgspec structs.

A `GenerationRequest` is built once by the service (app/service.py) from the HTTP body and
travels unchanged to the engine, in-process or over ZeroMQ (msgpack); the engine answers with
`Event`s, which travel unchanged back to whoever reads the request's stream. Nothing copies a
request or an event field by field on the way: a new sampling field is added to `Sampling` and
read by the engine core (app/engine/batch.py), and the HTTP schema carries it by name.

Over ZeroMQ an HTTP worker's DEALER socket talks to the engine's ROUTER socket; per flush the
engine sends each worker one `Outputs` message holding the events of all its requests, never
one message per character per request.
"""

from __future__ import annotations

import hashlib
import math

import msgspec

# Largest values the engine's per-row arrays hold; the HTTP schema refuses larger ones first,
# and a request that reaches the engine with more fails alone instead of breaking the batch.
MAX_TOP_K = 2**31 - 1
MAX_SEED = 2**63
TOP_ALTERNATIVES = 5  # alternatives per character with `details`
MAX_BIAS = 100.0  # logit_bias in [-100, 100]; -100 bans the character


class Sampling(msgspec.Struct, frozen=True, array_like=True):
    """How the next character is drawn. Fields are named as the HTTP schema names them, so
    the service copies them by name (app/service.py `sampling_from`), and continuation handles
    carry them whole."""

    temperature: float = 1.0  # 0 is greedy
    top_k: int = 0  # 0 is off
    top_p: float = 1.0  # 1 is off
    seed: int = 0
    # (id, bias) pairs added to the logits before sampling; -100 bans the id. Last, so handles
    # sealed before it existed still decode.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Stop strings cannot end the text before this many characters (the matcher's business:
    # both decode paths emit through it, so nothing here for the samplers).
    min_tokens: int = 0
    # Drop ids whose probability (after temperature, bias and constraint) is below min_p times
    # the likeliest's; 0 is off. Rows with it sample on the host, as shaped rows do.
    min_p: float = 0.0

    def check(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature out of range: {self.temperature}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k out of range: {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p out of range: {self.top_p}")
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed out of range: {self.seed}")
        for i, b in self.logit_bias:
            if i < 0 or not (math.isfinite(b) and -MAX_BIAS <= b <= MAX_BIAS):
                raise ValueError(f"logit_bias out of range: {i}: {b}")
        if not 0 <= self.min_tokens < 2**62:
            raise ValueError(f"min_tokens out of range: {self.min_tokens}")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p out of range: {self.min_p}")


SAMPLING_FIELDS: tuple[str, ...] = Sampling.__struct_fields__


class Constraint(msgspec.Struct, frozen=True, array_like=True):
    """A compiled constraint (app/constraints.py): a DFA over the model's vocabulary, sent once
    with its request. From state s, id i leads to table[s, i] (-1: not allowed); `dist[s]` is
    the fewest characters from s to an accepting state; state 0 starts."""

    states: int
    vocab: int
    table: bytes  # int32 (states, vocab), native byte order
    accepting: bytes  # uint8 (states,)
    dist: bytes  # int32 (states,)

    def check(self) -> None:
        if self.states < 1 or self.vocab < 1:
            raise ValueError("constraint has no states")
        if (len(self.table), len(self.accepting), len(self.dist)) != (
                4 * self.states * self.vocab, self.states, 4 * self.states):
            raise ValueError("constraint arrays do not match its shape")
class Scoring(msgspec.Struct, frozen=True, array_like=True):
    """Score the seed in its prefill: log p(seed[t] | seed[:t]) for every seed position
    t >= `start` (>= 1: the first character has no context), with the `top` likeliest
    alternatives at each. The step graph returns logits for every position of a prefill
    slice, so this costs one float64 log-softmax per position and no extra graph call."""

    start: int = 1
    top: int = 0  # alternatives per position, 0 to TOP_ALTERNATIVES

    def check(self, seed_len: int) -> None:
        if not 1 <= self.start <= max(seed_len, 1):
            raise ValueError(f"score start out of range: {self.start}")
        if not 0 <= self.top <= TOP_ALTERNATIVES:
            raise ValueError(f"score top out of range: {self.top}")


MAX_N = 4096  # rows one request may fan out to (the engine's max_batch bounds it further)


def choice_seed(seed: int, index: int) -> int:
    """The random seed of choice `index` of a request seeded `seed`: the seed itself for
    choice 0, so a request with n = 1 is choice 0 of the same request with any n, and a
    BLAKE2b mix of (seed, index) for the others. Each choice is then reproducible alone, as
    a request with n = 1 and this seed."""
    if index == 0:
        return seed
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % MAX_SEED


class GenerationRequest(msgspec.Struct, tag="generate", array_like=True, kw_only=True):
    rid: int = 0  # set by the engine client: unique among its requests
    seed_ids: list[int]  # non-empty: the seed (or the one id a continuation feeds next)
    max_new: int  # 0: finish right after prefill (reason "length"), e.g. to score the seed
    sampling: Sampling = Sampling()
    stop: list[list[int]] = msgspec.field(default_factory=list)
    time_limit_s: float = 60.0
    details: bool = False
    # True: the reader wants characters as they arrive (streams). False: only the finish, so
    # a caller waiting for the whole text costs nothing per step.
    stream: bool = False
    submitted_at: float = 0.0  # time.perf_counter(): CLOCK_MONOTONIC, the same in every process
    # Continuations: start from these states (float32 (1, size) per state tensor) instead of
    # zeros, with the random stream at `counter_start`; `resumable` keeps the final state.
    initial_states: list[bytes] | None = None
    counter_start: int = 0
    resumable: bool = False
    # State-cache partition (a digest of the caller's API key): one caller's cached seeds
    # never speed up, and so never reveal themselves to, another.
    cache_scope: bytes = b""
    # Generated text must match this DFA (structured outputs); None: free text.
    constraint: Constraint | None = None
    # Score the seed during prefill (a `Scored` event before any character).
    score: Scoring | None = None
    # Choices sampled from one prefill: the state after the seed is copied into n rows, row i
    # seeded choice_seed(seed, i); their events carry `index`. Admission counts n rows.
    n: int = 1

    def check(self) -> None:
        """Raise ValueError unless every field fits the engine's arrays."""
        if not self.seed_ids:
            raise ValueError("seed must have at least one id")
        if not 0 <= self.max_new < 2**62:
            raise ValueError(f"max_new out of range: {self.max_new}")
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s out of range: {self.time_limit_s}")
        if not 0 <= self.counter_start < 2**62:
            raise ValueError(f"counter_start out of range: {self.counter_start}")
        if len(self.cache_scope) > 64:
            raise ValueError("cache_scope longer than 64 bytes")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n out of range: {self.n}")
        if self.score is not None:
            self.score.check(len(self.seed_ids))
        self.sampling.check()
        if self.constraint is not None:
            self.constraint.check()


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    rid: int


class Abort(msgspec.Struct, tag="abort", array_like=True):
    """End every request of this client now (its drain ran out of time)."""

    error: str


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """A client is here (sent on connect and as its heartbeat)."""

    pid: int


ToEngine = GenerationRequest | Cancel | Abort | Hello


# --- events: engine -> reader -------------------------------------------------------------

class Admitted(msgspec.Struct, tag="admitted", array_like=True):
    """Queued: the request will get a row (or finish with a reason)."""

    rid: int


class Refused(msgspec.Struct, tag="refused", array_like=True):
    """Not queued: the predicted wait or the queue is too long (`overloaded`, retry after
    `retry_after` s), the engine is not taking requests (`unavailable`), or the request
    cannot be run (`invalid`)."""

    rid: int
    kind: str  # overloaded | unavailable | invalid
    message: str
    retry_after: int = 1


class Started(msgspec.Struct, array_like=True):
    """When the request got its row and its first character (perf_counter seconds)."""

    admitted_at: float
    first_at: float
    prefill_s: float


# (the model's probability at temperature 1, [(id, probability) of its likeliest ids], the
# probability at temperature 1 after logit_bias and the constraint's mask: None without them)
Detail = tuple[float, list[tuple[int, float]], float | None]


class Chars(msgspec.Struct, tag="chars", array_like=True):
    """Characters (ids) emitted since the request's last event: never part of a stop string."""

    rid: int
    ids: list[int]
    details: list[Detail] | None = None
    started: Started | None = None  # with the request's first characters
    index: int = 0  # which choice (requests with n > 1)


# Per scored position: [(id, log-probability)] of the likeliest ids, likeliest first.
TopLogprobs = list[tuple[int, float]]


class Scored(msgspec.Struct, tag="scored", array_like=True):
    """The seed's scores (requests with `score`), once its prefill is done, before any
    character: logprobs[i] = log p(seed[start + i] | seed[:start + i]) in nats, computed in
    float64 from the step graph's logits."""

    rid: int
    start: int
    logprobs: list[float]
    top: list[TopLogprobs] | None = None


class Final(msgspec.Struct, array_like=True):
    """What continuing a resumable request exactly needs: the state before its last id, that
    id, and how many ids its random stream has given."""

    states: list[bytes]
    last_id: int
    counter: int


class Finished(msgspec.Struct, tag="finished", array_like=True):
    """The last event of an admitted request."""

    rid: int
    reason: str  # length | stop | time_limit | cancelled | error
    error: str | None
    sampled: int
    submitted_at: float
    started: Started | None  # None when it never produced a character
    finished_at: float
    prefill_s: float
    final: Final | None = None
    index: int = 0  # which choice (requests with n > 1: one Finished per choice)

    def timings(self) -> dict[str, float]:
        end, t0 = self.finished_at, self.submitted_at
        admitted = self.started.admitted_at if self.started else end
        first = self.started.first_at if self.started else end
        return {
            "queue_ms": round((admitted - t0) * 1e3, 3),
            "prefill_ms": round(self.prefill_s * 1e3, 3),
            "first_char_ms": round((first - t0) * 1e3, 3),
            "decode_ms": round(max(end - admitted - self.prefill_s, 0.0) * 1e3, 3),
            "total_ms": round((end - t0) * 1e3, 3),
        }


Event = Admitted | Refused | Scored | Chars | Finished


class Outputs(msgspec.Struct, tag="outputs", array_like=True):
    """One flush's events for one client."""

    events: list[Event]


class Status(msgspec.Struct, tag="status", array_like=True):
    """The engine's heartbeat: it is alive, and what admission and /models report."""

    pid: int
    provider: str
    graph: str  # the graph file served: model.onnx or a variant's
    decode_graph: str  # the decode graph sampling K ids per call; "" when sampling on the host
    waiting: int
    active: int
    predicted_wait_s: float
    chars_per_s: float


FromEngine = Outputs | Status

to_engine = msgspec.msgpack.Decoder(ToEngine)
from_engine = msgspec.msgpack.Decoder(FromEngine)
encoder = msgspec.msgpack.Encoder()
