"""Messages between HTTP workers and an engine process, as msgpack (msgspec) over ZeroMQ.

An HTTP worker's DEALER socket talks to the engine's ROUTER socket. Per step the engine
sends each worker one `Outputs` message holding the new ids of all that worker's requests,
never one message per character per request.
"""

from __future__ import annotations

import msgspec


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """A worker is here (sent on connect and as its heartbeat)."""

    pid: int


class Submit(msgspec.Struct, tag="submit", array_like=True):
    rid: int  # unique within the worker
    seed_ids: list[int]
    max_new: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: list[list[int]]
    time_limit_s: float
    details: bool
    stream: bool
    submitted_at: float  # time.perf_counter(): CLOCK_MONOTONIC, the same in every process
    initial_states: list[bytes] | None = None  # a continuation's states, float32 (1, size)
    counter_start: int = 0
    resumable: bool = False
    cache_scope: bytes = b""


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    rid: int


class Abort(msgspec.Struct, tag="abort", array_like=True):
    """End every request of this worker now (its drain ran out of time)."""

    error: str


ToEngine = Hello | Submit | Cancel | Abort


class Admission(msgspec.Struct, tag="admission", array_like=True):
    rid: int
    refusal: str | None  # None: admitted
    retry_after: int


class Finish(msgspec.Struct, array_like=True):
    reason: str
    error: str | None
    sampled: int
    admitted_at: float | None
    first_at: float | None
    finished_at: float
    prefill_s: float
    final_states: list[bytes] | None = None  # resumable: state before the last character
    final_id: int = 0
    final_counter: int = 0


class Delta(msgspec.Struct, array_like=True):
    rid: int
    ids: list[int]
    # (prob, [(id, prob), ...]) per sampled id, for requests that asked for details
    details: list[tuple[float, list[tuple[int, float]]]] | None
    finish: Finish | None


class Outputs(msgspec.Struct, tag="outputs", array_like=True):
    deltas: list[Delta]


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


FromEngine = Admission | Outputs | Status

to_engine = msgspec.msgpack.Decoder(ToEngine)
from_engine = msgspec.msgpack.Decoder(FromEngine)
encoder = msgspec.msgpack.Encoder()
