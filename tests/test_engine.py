"""Decode engine properties, against a fake model and against a real ONNX model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.engine import Engine, GenerationParams, QueueFullError, Request
from app.runtime import RuntimeOptions, load_model
from tests.fakes import FakeModel


def params(seed_ids: list[int], **kw: Any) -> GenerationParams:
    return GenerationParams(seed_ids=np.array(seed_ids, np.int32), **kw)


async def finish(req: Request) -> Request:
    while not req.done:
        await req.wait(5)
    return req


def run(coro):
    return asyncio.run(coro)


def test_greedy_follows_the_model_and_respects_max_new() -> None:
    async def go() -> Request:
        engine = Engine(FakeModel(vocab=7))
        engine.start()
        try:
            return await finish(engine.submit(params([3], max_new=10, temperature=0.0)))
        finally:
            engine.close()

    req = run(go())
    assert req.ids == [4, 5, 6, 0, 1, 2, 3, 4, 5, 6]
    assert req.finish_reason == "length"


def test_stop_sequence_ends_generation_and_is_never_emitted() -> None:
    async def go() -> Request:
        engine = Engine(FakeModel(vocab=7))
        engine.start()
        try:
            return await finish(engine.submit(params([0], max_new=50, temperature=0.0,
                                                     stop=[(4, 5)])))
        finally:
            engine.close()

    req = run(go())
    assert req.finish_reason == "stop"
    assert req.ids == [1, 2, 3]


def test_cancel_frees_the_row_within_one_step() -> None:
    async def go() -> tuple[Request, int, int]:
        model = FakeModel()
        engine = Engine(model)
        engine.start()
        try:
            req = engine.submit(params([0], max_new=10**9, temperature=0.0, stream=True))
            while len(req.ids) < 5:
                await req.wait(5)
            calls_at_cancel = model.calls
            req.cancel()
            await finish(req)
            return req, model.calls - calls_at_cancel, engine.active
        finally:
            engine.close()

    req, extra_calls, active = run(go())
    assert req.finish_reason == "cancelled"
    assert extra_calls <= 1
    assert active == 0


def test_full_queue_is_refused_at_once() -> None:
    async def go() -> None:
        engine = Engine(FakeModel(), max_batch=1, max_queue=2)  # not started: nothing drains
        engine._loop = asyncio.get_running_loop()
        for _ in range(3):  # one row + two queue places
            engine.submit(params([0], max_new=5))
        with pytest.raises(QueueFullError) as err:
            engine.submit(params([0], max_new=5))
        assert err.value.retry_after == 1

    run(go())


def test_a_failing_step_errors_its_batch_and_the_engine_keeps_serving() -> None:
    async def go() -> tuple[Request, Request]:
        model = FakeModel()
        engine = Engine(model)
        engine.start()
        try:
            model.fail_after = 3
            first = await finish(engine.submit(params([0], max_new=100)))
            model.fail_after = None
            second = await finish(engine.submit(params([0], max_new=5, temperature=0.0)))
            return first, second
        finally:
            engine.close()

    first, second = run(go())
    assert first.finish_reason == "error"
    assert "RuntimeError" in (first.error or "")
    assert second.finish_reason == "length"
    assert second.ids == [1, 2, 3, 4, 5]


def test_time_limit_stops_generation() -> None:
    async def go() -> Request:
        engine = Engine(FakeModel())
        engine.start()
        try:
            return await finish(engine.submit(params([0], max_new=10**9, time_limit_s=0.05)))
        finally:
            engine.close()

    req = run(go())
    assert req.finish_reason == "time_limit"
    assert len(req.ids) > 0


def test_seeded_request_is_identical_alone_and_beside_63_others(tiny_models: Path) -> None:
    model = load_model(tiny_models / "tiny", RuntimeOptions(device="cpu"))
    seed_ids = model.vocab.encode("ROMEO:\n")

    async def go() -> tuple[list[int], list[int], int]:
        engine = Engine(model)
        engine.start()
        try:
            alone = await finish(engine.submit(GenerationParams(
                seed_ids=seed_ids, max_new=120, temperature=1.0, seed=7)))
            crowd = [engine.submit(GenerationParams(
                seed_ids=model.vocab.encode("KING" if i % 2 else "ROMEO:"), max_new=80 + i,
                temperature=1.0, top_k=i % 5, seed=1000 + i)) for i in range(63)]
            mine = engine.submit(GenerationParams(seed_ids=seed_ids, max_new=120,
                                                  temperature=1.0, seed=7))
            await asyncio.gather(*(finish(r) for r in [*crowd, mine]))
            return alone.ids, mine.ids, max(len(r.ids) for r in crowd)
        finally:
            engine.close()

    alone, beside, longest = run(go())
    assert longest > 100  # the crowd really ran alongside
    assert alone == beside
