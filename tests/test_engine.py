"""Decode engine properties, against a fake model and against a real ONNX model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.artifact import read_metadata
from app.engine import Engine, EngineClosedError, EngineCore, GenerationParams, Request, Sequence
from app.runtime import RuntimeOptions, batch_invariant, load_model, serving_variant
from tests.conftest import ROOT
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
            return await finish(await engine.submit(params([3], max_new=10, temperature=0.0)))
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
            return await finish(await engine.submit(params([0], max_new=50, temperature=0.0,
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
            req = await engine.submit(params([0], max_new=10**9, temperature=0.0, stream=True))
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


def test_full_queue_is_refused_at_once_whatever_the_prediction() -> None:
    core = EngineCore(FakeModel(), max_batch=1, max_queue=2, max_wait_s=1e9)
    for _ in range(3):  # one row + two queue places
        core.submit(Sequence(params([0], max_new=5)))
    core.iterate()  # the first takes the row
    core.submit(Sequence(params([0], max_new=5)))
    _, refusal, retry = core.admission(params([0], max_new=5))
    assert refusal is not None
    assert "at capacity" in refusal
    assert retry >= 1


def test_a_failing_step_errors_its_batch_and_the_engine_keeps_serving() -> None:
    async def go() -> tuple[Request, Request]:
        model = FakeModel()
        engine = Engine(model)
        engine.start()
        try:
            model.fail_after = 3
            first = await finish(await engine.submit(params([0], max_new=100)))
            model.fail_after = None
            second = await finish(await engine.submit(params([0], max_new=5, temperature=0.0)))
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
            return await finish(await engine.submit(params([0], max_new=10**9, time_limit_s=0.05)))
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
            alone = await finish(await engine.submit(GenerationParams(
                seed_ids=seed_ids, max_new=120, temperature=1.0, seed=7)))
            crowd = [await engine.submit(GenerationParams(
                seed_ids=model.vocab.encode("KING" if i % 2 else "ROMEO:"), max_new=80 + i,
                temperature=1.0, top_k=i % 5, seed=1000 + i)) for i in range(63)]
            mine = await engine.submit(GenerationParams(seed_ids=seed_ids, max_new=120,
                                                  temperature=1.0, seed=7))
            await asyncio.gather(*(finish(r) for r in [*crowd, mine]))
            return alone.ids, mine.ids, max(len(r.ids) for r in crowd)
        finally:
            engine.close()

    alone, beside, longest = run(go())
    assert longest > 100  # the crowd really ran alongside
    assert alone == beside


@pytest.mark.parametrize("name", ["shakespeare", "nietzsche"])
def test_the_graph_a_bundled_model_serves_keeps_seeded_text_under_load(name: str) -> None:
    """The graph `CHARLSTM_VARIANT=auto` picks on the CPU (measured: the int8 variants, which
    quantize activations over the whole batch, gave another text for 10 of 10 seeds beside 15
    other streams, from character 2 to 127)."""
    folder = ROOT / "models" / name
    variant = serving_variant(read_metadata(folder), "cpu", "auto")
    model = load_model(folder, RuntimeOptions(device="cpu"), variant=variant)
    assert batch_invariant(model)
    seed_ids = model.vocab.encode("the ")

    async def go() -> list[tuple[list[int], list[int]]]:
        engine = Engine(model)
        engine.start()
        try:
            pairs = []
            for seed in range(3):
                alone = await finish(await engine.submit(GenerationParams(
                    seed_ids=seed_ids, max_new=300, temperature=1.0, seed=seed)))
                crowd = [await engine.submit(GenerationParams(
                    seed_ids=model.vocab.encode("and " * (i + 1)), max_new=300,
                    temperature=1.0, seed=1000 + i)) for i in range(15)]
                mine = await engine.submit(GenerationParams(seed_ids=seed_ids, max_new=300,
                                                      temperature=1.0, seed=seed))
                await asyncio.gather(*(finish(r) for r in [*crowd, mine]))
                pairs.append((alone.ids, mine.ids))
            return pairs
        finally:
            engine.close()

    for alone, beside in run(go()):
        assert len(alone) == 300
        assert alone == beside


def test_parameters_the_arrays_cannot_hold_fail_that_request_alone() -> None:
    core = EngineCore(FakeModel(vocab=7))
    ok = Sequence(params([0], max_new=4, temperature=0.0))
    bad = [Sequence(params([0], max_new=4, top_k=2**63)),
           Sequence(params([0], max_new=4, seed=2**64)),
           Sequence(params([0], max_new=2**70)),
           Sequence(params([0], max_new=4, top_p=float("nan")))]
    for s in [bad[0], ok, *bad[1:]]:
        core.submit(s)
    while core.has_work:
        core.iterate()
    assert [s.finish_reason for s in bad] == ["error"] * 4
    assert all("invalid generation parameters" in (s.error or "") for s in bad)
    assert ok.finish_reason == "length"
    assert ok.ids == [1, 2, 3, 4]


def test_long_seeds_are_prefilled_in_slices_beside_a_running_row() -> None:
    model = FakeModel(vocab=7)
    core = EngineCore(model, prefill_chunk_chars=100)
    running = Sequence(params([0], max_new=10**6, temperature=0.0, stream=True))
    core.submit(running)
    core.iterate()
    longs = [Sequence(params([i % 7] * 4000, max_new=1, temperature=0.0)) for i in range(5)]
    for s in longs:
        core.submit(s)
    per_iteration: list[int] = []
    while not all(s.done for s in longs):
        before = len(model.batch_sizes)
        shapes_before = len(model.shapes)
        core.iterate()
        prefill = sum(b * t for b, t in model.shapes[shapes_before:] if t > 1 or b != len(
            core.batch))
        per_iteration.append(prefill)
        assert len(model.batch_sizes) > before
    # Every iteration advanced the running row by one character; no iteration prefilled
    # more than the slice, and 5 x 4000 seed characters needed 200 iterations of 100.
    assert len(running.ids) == len(per_iteration) + 1
    assert max(per_iteration) <= 100
    assert all(s.finish_reason == "length" and len(s.ids) == 1 for s in longs)
    # FakeModel's state counts the characters run through it: the whole seed, exactly once.
    assert [s.ids[0] for s in longs] == [(i % 7 + 1) % 7 for i in range(5)]


def test_sliced_prefill_gives_the_same_text_as_whole_seeds(tiny_models: Path) -> None:
    model = load_model(tiny_models / "tiny", RuntimeOptions(device="cpu"))
    seeds = ["ROMEO:\nWhat light through yonder window breaks? " * 6, "KING:", "A" * 301]

    def generate(chunk: int) -> list[list[int]]:
        core = EngineCore(model, prefill_chunk_chars=chunk)
        seqs = [Sequence(GenerationParams(seed_ids=model.vocab.encode(t), max_new=60,
                                          temperature=0.8, seed=3 + i))
                for i, t in enumerate(seeds)]
        for s in seqs:
            core.submit(s)
        while core.has_work:
            core.iterate()
        return [s.ids for s in seqs]

    assert generate(7) == generate(100_000)


def test_predicted_wait_counts_the_work_ahead_and_refuses_past_the_bound() -> None:
    core = EngineCore(FakeModel(), max_batch=2, max_queue=100, max_wait_s=0.5,
                      prefill_chunk_chars=10)
    core.step_fixed_s, core.step_row_s = 0.001, 0.0  # as if calibrated: 1 ms per iteration
    assert core.predict_wait() == 0.0  # free rows
    for n in (100, 300):
        core.submit(Sequence(params([0], max_new=n)))
    core.iterate()
    core.factor, core.prefill_s_per_char = 1.0, 0.0
    # Rows free after ~99 and ~299 more iterations; a newcomer takes the first to free.
    assert core.predict_wait() == pytest.approx(0.099, abs=0.003)
    core.submit(Sequence(params([0] * 25, max_new=1000)))  # 3 prefill slices + 1000 chars
    # Behind it, the next newcomer waits for the 300-row: ~0.299 s.
    assert core.predict_wait() == pytest.approx(0.299, abs=0.003)
    wait, refusal, _ = core.admission(params([0], max_new=10))
    assert refusal is None
    assert wait == pytest.approx(0.299, abs=0.003)
    core.submit(Sequence(params([0], max_new=1000)))
    # Now the queue ahead holds the 1003-iteration request placed at ~0.099 s.
    wait, refusal, retry = core.admission(params([0], max_new=10))
    assert wait == pytest.approx(1.102, abs=0.005)
    assert refusal is not None
    assert "wait about 1.1 s" in refusal
    assert retry == 1  # ceil(1.102 - 0.5)
    # Soft: a predicted wait a little past the bound is admitted (the estimate may be off).
    core.max_wait_s = 1.0
    assert core.admission(params([0], max_new=10))[1] is None
    core.max_wait_s = 0.5
    # A request whose own deadline cannot be met after the wait is refused at once.
    core.max_wait_s = 10
    _, refusal, _ = core.admission(params([0], max_new=10, time_limit_s=1.0))
    assert refusal is not None
    assert "time limit" in refusal


class EngineKilled(BaseException):
    """Escapes every `except Exception`: stands for a worker that dies outright."""


class DyingModel(FakeModel):
    """Dies at its third step of a request (calibration at start-up feeds only zeros)."""

    request_calls = 0

    def step(self, ids: Any, states: object) -> Any:
        if np.any(ids != 0):
            self.request_calls += 1
            if self.request_calls >= 3:
                raise EngineKilled
        return super().step(ids, states)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_fails_its_requests_and_refuses_new_ones() -> None:
    async def go() -> tuple[Request, bool]:
        engine = Engine(DyingModel())
        engine.start()
        try:
            req = await finish(await engine.submit(params([1], max_new=100)))
            for _ in range(100):
                if not engine.alive:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(EngineClosedError):
                await engine.submit(params([0], max_new=5))
            return req, engine.alive
        finally:
            engine.close()

    req, alive = run(go())
    assert not alive
    assert req.finish_reason == "error"
    assert "engine stopped" in (req.error or "")


def test_drain_past_its_grace_ends_every_request_with_an_error() -> None:
    async def go() -> tuple[list[Request], bool]:
        engine = Engine(FakeModel(), max_batch=2, max_wait_s=1e12)  # one waits, two run
        engine.start()
        try:
            reqs = [await engine.submit(params([0], max_new=10**9, stream=True, time_limit_s=1e9))
                    for _ in range(3)]
            clean = await engine.drain(0.1)
            await asyncio.gather(*(finish(r) for r in reqs))
            return reqs, clean
        finally:
            engine.close()

    reqs, clean = run(go())
    assert not clean
    assert [r.finish_reason for r in reqs] == ["error"] * 3
    assert all("drain time" in (r.error or "") for r in reqs)


def test_refusals_are_judged_in_line_one_row_each() -> None:
    """Two requests refused back to back would have stood one behind the other: the first
    is judged at the first admission after those waiting, the second at the next one."""
    core = EngineCore(FakeModel(), max_batch=1, max_queue=100, max_wait_s=0.05)
    core.step_fixed_s, core.step_row_s = 0.001, 0.0
    core.submit(Sequence(params([0], max_new=3)))
    core.iterate()  # holds the only row for 2 more iterations
    core.submit(Sequence(params([0], max_new=200)))  # waits ~2 ms: admitted
    for _ in range(2):
        _, refusal, _ = core.admission(params([0], max_new=10))  # behind 200: ~0.2 s
        assert refusal is not None
    while core.waiting:
        core.iterate()
    # The queued request took the row: nobody's row came yet.
    assert core.false_refusals + core.justified_refusals == 0
    core.submit(Sequence(params([0], max_new=1)))
    while core.has_work:
        core.iterate()
    # Its admission was the first refused one's row (that came at once here: false).
    assert (core.false_refusals, core.justified_refusals) == (1, 0)
    core.iterate()  # an empty queue and a free row: the second one's, now
    assert (core.false_refusals, core.justified_refusals) == (2, 0)
    core.iterate()  # that row is taken (virtually) for its run: nothing more to judge
    assert (core.false_refusals, core.justified_refusals) == (2, 0)
