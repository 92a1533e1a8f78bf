"""Decode engine properties, against a fake model and against a real ONNX model."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.artifact import read_metadata
from app.engine.batch import Sequence
from app.engine.client import EngineUnavailableError
from app.engine.core import EngineCore
from app.engine.messages import Chars
from app.runtime import RuntimeOptions, batch_invariant, load_model, serving_variant
from tests.conftest import ROOT
from tests.fakes import (
    FakeModel,
    RecordingObserver,
    Result,
    request,
    result_of,
    run_one,
    running_engine,
)

params = request


def run(coro):
    return asyncio.run(coro)


def test_greedy_follows_the_model_and_respects_max_new() -> None:
    async def go() -> Result:
        async with running_engine(FakeModel(vocab=7)) as (engine, _):
            return await run_one(engine, params([3], max_new=10, temperature=0.0))

    req = run(go())
    assert req.ids == [4, 5, 6, 0, 1, 2, 3, 4, 5, 6]
    assert req.finish_reason == "length"


def test_stop_sequence_ends_generation_and_is_never_emitted() -> None:
    async def go() -> Result:
        async with running_engine(FakeModel(vocab=7)) as (engine, _):
            return await run_one(engine, params([0], max_new=50, temperature=0.0,
                                                stop=[[4, 5]]))

    req = run(go())
    assert req.finish_reason == "stop"
    assert req.ids == [1, 2, 3]


def test_cancel_frees_the_row_within_one_step() -> None:
    async def go() -> tuple[Sequence, int, int]:
        model = FakeModel()
        observer = RecordingObserver()
        async with running_engine(model, observer) as (engine, core):
            events = engine.generate(params([0], max_new=10**9, temperature=0.0, stream=True))
            got = 0
            async for e in events:
                if isinstance(e, Chars):
                    got += len(e.ids)
                if got >= 5:
                    break
            calls_at_cancel = model.calls
            await events.aclose()  # the reader leaves: the request is cancelled
            for _ in range(500):
                if observer.finished:
                    break
                await asyncio.sleep(0.01)
            return observer.finished[0], model.calls - calls_at_cancel, core.active

    seq, extra_calls, active = run(go())
    assert seq.finish_reason == "cancelled"
    # The cancel reaches the engine before its next step (GIL hand-offs may let one more in).
    assert extra_calls <= 2
    assert active == 0


def test_full_queue_is_refused_at_once_whatever_the_prediction() -> None:
    core = EngineCore(FakeModel(), max_batch=1, max_queue=2, max_wait_s=1e9)
    for _ in range(3):  # one row + two queue places
        core.submit(Sequence(params([0], max_new=5)))
    core.iterate()  # the first takes the row
    core.submit(Sequence(params([0], max_new=5)))
    decision = core.admission(params([0], max_new=5))
    assert decision.refusal is not None
    assert "at capacity" in decision.refusal
    assert decision.retry_after >= 1


def test_a_failing_step_errors_its_batch_and_the_engine_keeps_serving() -> None:
    async def go() -> tuple[Result, Result]:
        model = FakeModel()
        async with running_engine(model) as (engine, _):
            model.fail_after = model.calls + 3
            first = await run_one(engine, params([0], max_new=100))
            model.fail_after = None
            second = await run_one(engine, params([0], max_new=5, temperature=0.0))
            return first, second

    first, second = run(go())
    assert first.finish_reason == "error"
    assert "RuntimeError" in (first.error or "")
    assert second.finish_reason == "length"
    assert second.ids == [1, 2, 3, 4, 5]


def test_time_limit_stops_generation() -> None:
    async def go() -> Result:
        async with running_engine(FakeModel()) as (engine, _):
            return await run_one(engine, params([0], max_new=10**9, time_limit_s=0.05))

    req = run(go())
    assert req.finish_reason == "time_limit"
    assert len(req.ids) > 0


def test_seeded_request_is_identical_alone_and_beside_63_others(tiny_models: Path) -> None:
    model = load_model(tiny_models / "tiny", RuntimeOptions(device="cpu"))
    seed_ids = model.vocab.encode("ROMEO:\n")

    async def go() -> tuple[list[int], list[int], int]:
        async with running_engine(model) as (engine, _):
            alone = await run_one(engine, params(seed_ids, max_new=120, temperature=1.0,
                                                 seed=7))
            crowd = [run_one(engine, params(
                model.vocab.encode("KING" if i % 2 else "ROMEO:"), max_new=80 + i,
                temperature=1.0, top_k=i % 5, seed=1000 + i)) for i in range(63)]
            mine = run_one(engine, params(seed_ids, max_new=120, temperature=1.0, seed=7))
            *others, beside = await asyncio.gather(*crowd, mine)
            return alone.ids, beside.ids, max(len(r.ids) for r in others)

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
        async with running_engine(model) as (engine, _):
            pairs = []
            for seed in range(3):
                alone = await run_one(engine, params(seed_ids, max_new=300, temperature=1.0,
                                                     seed=seed))
                crowd = [run_one(engine, params(model.vocab.encode("and " * (i + 1)),
                                                max_new=300, temperature=1.0, seed=1000 + i))
                         for i in range(15)]
                mine = run_one(engine, params(seed_ids, max_new=300, temperature=1.0,
                                              seed=seed))
                *_, beside = await asyncio.gather(*crowd, mine)
                pairs.append((alone.ids, beside.ids))
            return pairs

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
        seqs = [Sequence(params(model.vocab.encode(t), max_new=60, temperature=0.8,
                                seed=3 + i))
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
    policy = core.policy
    policy.step_fixed_s, policy.step_row_s = 0.001, 0.0  # as if calibrated: 1 ms per iteration
    assert policy.predict_wait() == 0.0  # free rows
    for n in (100, 300):
        core.submit(Sequence(params([0], max_new=n)))
    core.iterate()
    policy.factor, policy.prefill_s_per_char = 1.0, 0.0
    # Rows free after ~99 and ~299 more iterations; a newcomer takes the first to free.
    assert policy.predict_wait() == pytest.approx(0.099, abs=0.003)
    core.submit(Sequence(params([0] * 25, max_new=1000)))  # 3 prefill slices + 1000 chars
    # Behind it, the next newcomer waits for the 300-row: ~0.299 s.
    assert policy.predict_wait() == pytest.approx(0.299, abs=0.003)
    d = core.admission(params([0], max_new=10))
    assert d.refusal is None
    assert d.wait_s == pytest.approx(0.299, abs=0.003)
    core.submit(Sequence(params([0], max_new=1000)))
    # Now the queue ahead holds the 1003-iteration request placed at ~0.099 s.
    d = core.admission(params([0], max_new=10))
    assert d.wait_s == pytest.approx(1.102, abs=0.005)
    assert d.refusal is not None
    assert "wait about 1.1 s" in d.refusal
    assert d.retry_after == 1  # ceil(1.102 - 0.5)
    # Soft: a predicted wait a little past the bound is admitted (the estimate may be off).
    policy.max_wait_s = 1.0
    assert core.admission(params([0], max_new=10)).refusal is None
    # A request whose own deadline cannot be met after the wait is refused at once.
    policy.max_wait_s = 10
    d = core.admission(params([0], max_new=10, time_limit_s=1.0))
    assert d.refusal is not None
    assert "time limit" in d.refusal


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
    async def go() -> tuple[Result, bool]:
        async with running_engine(DyingModel()) as (engine, _):
            req = await run_one(engine, params([1], max_new=100))
            for _ in range(100):
                if not engine.alive:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(EngineUnavailableError):
                await run_one(engine, params([0], max_new=5))
            return req, engine.alive

    req, alive = run(go())
    assert not alive
    assert req.finish_reason == "error"
    assert "engine of model 'fake' stopped" in (req.error or "")


def test_drain_past_its_grace_ends_every_request_with_an_error() -> None:
    async def go() -> tuple[list[Result], bool]:
        # one waits, two run
        async with running_engine(FakeModel(), max_batch=2, max_wait_s=1e12) as (engine, _):
            streams = [engine.generate(params([0], max_new=10**9, stream=True,
                                              time_limit_s=1e9)) for _ in range(3)]
            for events in streams:
                await anext(events)  # admitted
            readers = [asyncio.ensure_future(result_of(e)) for e in streams]
            clean = await engine.drain(0.1)
            return list(await asyncio.gather(*readers)), clean

    reqs, clean = run(go())
    assert not clean
    assert [r.finish_reason for r in reqs] == ["error"] * 3
    assert all("drain time" in (r.error or "") for r in reqs)


def test_refusals_are_judged_in_line_one_row_each() -> None:
    """Two requests refused back to back would have stood one behind the other: the first
    is judged at the first admission after those waiting, the second at the next one."""
    # As if calibrated at 10 ms per iteration: the bound (1 s) is far from both the predicted
    # waits and from how long this test takes on a loaded machine (a verdict compares the
    # time a row came with the bound).
    core = EngineCore(FakeModel(), max_batch=1, max_queue=100, max_wait_s=1.0)
    policy = core.policy
    policy.step_fixed_s, policy.step_row_s = 0.01, 0.0
    core.submit(Sequence(params([0], max_new=3)))
    core.iterate()  # holds the only row for 2 more iterations
    core.submit(Sequence(params([0], max_new=200)))  # waits ~20 ms: admitted
    for _ in range(2):
        # behind 200: ~2 s
        assert core.admission(params([0], max_new=10)).refusal is not None
    while core.waiting:
        core.iterate()
    # The queued request took the row: nobody's row came yet.
    assert policy.false_refusals + policy.justified_refusals == 0
    core.submit(Sequence(params([0], max_new=1)))
    while core.has_work:
        core.iterate()
    # Its admission was the first refused one's row (that came at once here: false).
    assert (policy.false_refusals, policy.justified_refusals) == (1, 0)
    core.iterate()  # an empty queue and a free row: the second one's, now
    assert (policy.false_refusals, policy.justified_refusals) == (2, 0)
    core.iterate()  # that row is taken (virtually) for its run: nothing more to judge
    assert (policy.false_refusals, policy.justified_refusals) == (2, 0)


def test_the_engine_loop_and_client_speak_over_an_ipc_socket(tmp_path: Path) -> None:
    """The process layout's wire (msgpack over an `ipc://` socket), in one process: requests,
    events, cancellation and the heartbeat's status all cross it."""
    import zmq

    from app.engine.client import ClientTimings, EngineClient
    from app.engine.loop import EngineLoop, LoopTimings, router_socket

    async def go() -> tuple[Result, Result, int]:
        core = EngineCore(FakeModel(vocab=7))
        address = f"ipc://{tmp_path / 'fake.sock'}"
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        loop = EngineLoop(core, router_socket(ctx, address), "CPUExecutionProvider",
                          "model.onnx", LoopTimings())
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        client = EngineClient("fake", address, ClientTimings(),
                              gone=lambda pid: not thread.is_alive())
        client.start()
        try:
            assert await client.wait_alive(10)
            greedy = await run_one(client, params([3], max_new=10, temperature=0.0,
                                                   stream=True, details=True))
            stopped = await run_one(client, params([0], max_new=50, temperature=0.0,
                                                    stop=[[4, 5]]))
            return greedy, stopped, client.status.pid if client.status else 0
        finally:
            client.close()
            loop.stopping = True
            thread.join(5)
            loop.sock.close()
            ctx.term()

    greedy, stopped, pid = run(go())
    assert greedy.ids == [4, 5, 6, 0, 1, 2, 3, 4, 5, 6]
    assert len(greedy.details) == 10
    assert greedy.finished is not None
    assert greedy.finished.started is not None  # the engine's timings crossed too
    assert (stopped.ids, stopped.finish_reason) == ([1, 2, 3], "stop")
    assert pid == os.getpid()


def test_a_reader_that_falls_behind_gets_what_waited_in_one_event() -> None:
    """A slow reader never slows the batch: its characters wait in its stream, and the next
    read returns them merged into one Chars event, not one per engine flush."""
    async def go() -> tuple[int, int, int]:
        async with running_engine(FakeModel(vocab=7)) as (engine, _):
            events = engine.generate(params([0], max_new=3000, temperature=0.0, stream=True))
            await anext(events)  # admitted
            first = await anext(events)
            await asyncio.sleep(0.3)  # the engine goes on meanwhile
            later = await anext(events)
            rest = await result_of(events)
            assert isinstance(first, Chars)
            assert isinstance(later, Chars)
            return len(first.ids), len(later.ids), len(first.ids) + len(later.ids) + len(
                rest.ids)

    first, later, total = run(go())
    assert total == 3000
    assert later > 50 * max(first, 1) or later >= 3000 - first - 1


def test_start_up_stops_waiting_for_engines_that_will_never_come_when_told_to_stop(
        tmp_path: Path) -> None:
    """A worker told to stop before it serves (its supervisor was killed while it started)
    exits at once instead of waiting out the engines' start-up timeout: it used to sit
    there for 60 s, alive, with no supervisor."""
    import time
    from types import SimpleNamespace

    from app.engine.client import EngineClient
    from app.service import ModelService

    async def main() -> tuple[bool, float]:
        client = EngineClient("gone", f"ipc://{tmp_path / 'nobody.sock'}")
        client.start()
        svc = SimpleNamespace(models={"gone": SimpleNamespace(engine=client)},
                              stop_starting=asyncio.Event())
        asyncio.get_running_loop().call_later(0.2, svc.stop_starting.set)
        t0 = time.perf_counter()
        try:
            up = await ModelService.engines_up(svc, 60.0)  # type: ignore[arg-type]
        finally:
            client.close()
        return up, time.perf_counter() - t0

    up, waited = asyncio.run(main())
    assert not up
    assert waited < 10, f"start-up waited {waited:.1f} s after it was told to stop"


def test_a_stream_read_gives_up_after_its_own_idle_timeout_only() -> None:
    """The reader's idle timeout (the SSE keep-alive) counts from each read: a timer armed
    by an earlier read that events answered does not cut a later read short."""
    from app.engine.client import _Stream

    async def go() -> tuple[float, list[Any], float]:
        loop = asyncio.get_running_loop()
        stream = _Stream(params([0], max_new=5))
        t0 = loop.time()
        idle = await stream.take(0.05)  # nothing comes: [] after the timeout
        waited = loop.time() - t0
        loop.call_later(0.01, stream.put, Chars(1, [1]))
        got = await stream.take(0.2)  # answered early; its timer stays armed
        await asyncio.sleep(0.15)
        t1 = loop.time()
        late = await stream.take(0.2)  # the earlier timer fires 0.05 s in: not yet
        second = loop.time() - t1
        stream.close()
        assert idle == []
        assert late == []
        return waited, got, second

    waited, got, second = run(go())
    assert 0.045 <= waited < 0.5
    assert [e.ids for e in got] == [[1]]
    assert 0.19 <= second < 0.6
