"""A small deterministic stand-in for OnnxModel, and helpers that drive an engine, for sharp
engine unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from app.engine.batch import Sequence
from app.engine.client import ClientTimings, EngineClient, ThreadEngine, make_client
from app.engine.core import EngineCore
from app.engine.loop import LoopTimings
from app.engine.messages import (
    SAMPLING_FIELDS,
    Chars,
    Detail,
    Event,
    Finished,
    GenerationRequest,
    Sampling,
)


class FakeModel:
    """Vocabulary of V ids; the next id is (last + 1) % V by a wide margin, state counts steps."""

    name = "fake"

    def __init__(self, vocab: int = 7, fail_after: int | None = None) -> None:
        self.v = vocab
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.shapes: list[tuple[int, int]] = []  # (rows, characters) per call
        self.fail_after = fail_after

    def zero_states(self, rows: int) -> npt.NDArray[np.float32]:
        return np.zeros((rows, 1), np.float32)

    def states_from_host(self, arrays: list[npt.NDArray[np.float32]]) -> object:
        return np.asarray(arrays[0], np.float32)

    def states_to_host(self, states: object) -> list[npt.NDArray[np.float32]]:
        return [np.asarray(states, np.float32)]

    def select(self, states: object, rows: npt.NDArray[np.intp]) -> object:
        return np.asarray(states)[rows]

    def concat(self, parts: list[object]) -> object:
        return np.concatenate([np.asarray(p) for p in parts])

    def step(self, ids: npt.NDArray[np.int32], states: object
             ) -> tuple[npt.NDArray[np.float32], object]:
        self.calls += 1
        self.batch_sizes.append(ids.shape[0])
        self.shapes.append((int(ids.shape[0]), int(ids.shape[1])))
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("injected failure")
        b, t = ids.shape
        logits = np.zeros((b, t, self.v), np.float32)
        nxt = (ids + 1) % self.v
        np.put_along_axis(logits, nxt[..., None], 5.0, axis=-1)
        return logits, np.asarray(states) + t


def request(seed_ids: Any, **kw: Any) -> GenerationRequest:
    """A GenerationRequest from flat keywords (sampling fields among them)."""
    sampling = Sampling(**{k: kw.pop(k) for k in list(kw) if k in SAMPLING_FIELDS})
    ids = seed_ids.tolist() if hasattr(seed_ids, "tolist") else list(seed_ids)
    return GenerationRequest(seed_ids=ids, sampling=sampling, **kw)


class RecordingObserver:
    """Engine hooks that keep what a test asks about: every finished sequence."""

    def __init__(self) -> None:
        self.finished: list[Sequence] = []

    def on_step(self, batch: int, seconds: float) -> None: ...
    def on_prefill(self, rows: int, chars: int, seconds: float) -> None: ...
    def on_queue(self, waiting: int, active: int) -> None: ...
    def on_refusal_verdict(self, false: bool) -> None: ...
    def on_estimate(self, wait_s: float, chars_per_s: float) -> None: ...
    def on_cache(self, hit: bool, chars_saved: int, size_bytes: int, entries: int) -> None: ...
    def on_limits(self, max_batch: int, cache_bytes: int) -> None: ...
    def on_key(self, key: str, queued: int, rows: int) -> None: ...
    def on_key_finish(self, key: str, outcome: str, seed_chars: int, generated: int) -> None: ...
    def on_key_refused(self, key: str, cause: str) -> None: ...

    def on_finish(self, seq: Sequence) -> None:
        self.finished.append(seq)


@dataclass
class Result:
    """What a request's events added up to."""

    ids: list[int] = field(default_factory=list)
    details: list[Detail] = field(default_factory=list)
    finished: Finished | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.finished.reason if self.finished else None

    @property
    def error(self) -> str | None:
        return self.finished.error if self.finished else None


async def result_of(events: AsyncIterator[Event | None]) -> Result:
    res = Result()
    async for e in events:
        if isinstance(e, Chars):
            res.ids.extend(e.ids)
            res.details.extend(e.details or [])
        elif isinstance(e, Finished):
            res.finished = e
    return res


async def run_one(client: EngineClient, req: GenerationRequest) -> Result:
    """Submit and read to the end (raises RefusedError / EngineUnavailableError)."""
    return await result_of(client.generate(req))


@asynccontextmanager
async def running_engine(model: Any, observer: Any = None, **limits: Any
                         ) -> AsyncIterator[tuple[EngineClient, EngineCore]]:
    """An engine loop on a thread (the in-process layout) and its client, for `model`."""
    core = EngineCore(model, observer=observer, **limits)
    thread = ThreadEngine(core, "CPUExecutionProvider", "model.onnx", LoopTimings())
    client = make_client(model.name, thread.address, ClientTimings(), thread)
    client.start()
    try:
        assert await client.wait_alive(30), "the engine thread never answered"
        yield client, core
    finally:
        client.close()


def run_core(model: Any, decode: Any, reqs: list[GenerationRequest], **kw: Any
             ) -> list[Sequence]:
    """Drive an EngineCore directly over `reqs` until every one has finished."""
    core = EngineCore(model, decode=decode, **kw)
    seqs = [Sequence(r) for r in reqs]
    for s in seqs:
        core.submit(s)
    while core.has_work:
        core.iterate()
    return seqs
