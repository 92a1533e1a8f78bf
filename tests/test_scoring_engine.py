"""Scoring in prefill and n choices from one prefill: engine properties, against the fake
model and a real ONNX graph checked one character at a time."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import numpy as np
import pytest

from app.engine.client import RefusedError
from app.engine.messages import Chars, Finished, Scored, Scoring, choice_seed
from app.engine.scoring import log_softmax
from app.runtime import load_model
from tests.conftest import ROOT
from tests.fakes import FakeModel, request, run_one, running_engine
from tests.stepwise import stepwise


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def events_of(engine: Any, req: Any) -> list[Any]:
    return [e async for e in engine.generate(req) if e is not None][1:]  # after Admitted


def fake_logprob(prev: int, nxt: int, v: int = 7) -> float:
    logits = np.zeros(v)
    logits[(prev + 1) % v] = 5.0
    return float(log_softmax(logits)[nxt])


def test_scoring_gives_each_seed_characters_logprob_and_first_is_unscored() -> None:
    seed = [0, 1, 2, 5, 3, 3, 6, 0, 4]

    async def go() -> list[Any]:
        async with running_engine(FakeModel(vocab=7), prefill_chunk_chars=3) as (engine, _):
            return await events_of(engine, request(seed, max_new=0, score=Scoring(top=2)))

    events = run(go())
    assert [type(e) for e in events] == [Scored, Finished]
    scored, finished = events
    assert finished.reason == "length"
    assert finished.sampled == 0
    assert scored.start == 1
    want = [fake_logprob(a, b) for a, b in itertools.pairwise(seed)]
    assert scored.logprobs == pytest.approx(want, abs=1e-12)
    # top alternatives: the likeliest first, the chosen id's value identical when it is there
    for (prev, tok), lp, top in zip(itertools.pairwise(seed), scored.logprobs,
                                    scored.top, strict=True):
        assert top[0][0] == (prev + 1) % 7
        assert len(top) == 2
        for t, v in top:
            if t == tok:
                assert v == lp


def test_scores_do_not_depend_on_the_prefill_slicing_or_the_state_cache() -> None:
    seed = np.random.default_rng(3).integers(0, 7, 40).tolist()

    async def go(chunk: int, cache: int) -> list[list[float]]:
        out = []
        async with running_engine(FakeModel(vocab=7), prefill_chunk_chars=chunk,
                                  state_cache_bytes=cache) as (engine, _):
            # the first request fills the cache with the seed's prefixes and the whole seed
            await run_one(engine, request(seed, max_new=2, temperature=0.0))
            for start in (1, 9, 16, 17, 39):
                events = await events_of(engine, request(seed, max_new=1, temperature=0.0,
                                                         score=Scoring(start=start)))
                scored = events[0]
                assert isinstance(scored, Scored)
                assert scored.start == start
                out.append(scored.logprobs)
        return out

    whole = run(go(64, 0))
    assert run(go(8, 0)) == whole
    assert run(go(8, 1 << 20)) == whole
    assert len(whole[0]) == 39
    assert whole[1] == whole[0][8:]
    assert len(whole[4]) == 1


def test_a_score_only_request_runs_no_decode_step() -> None:
    async def go() -> tuple[list[Any], list[tuple[int, int]]]:
        model = FakeModel(vocab=7)
        async with running_engine(model) as (engine, _):
            before = len(model.shapes)  # the wait predictions' calibration calls
            events = await events_of(engine, request([1, 2, 3], max_new=0, score=Scoring()))
            return events, model.shapes[before:]

    events, calls = run(go())
    assert calls == [(1, 3)]  # the prefill, nothing else
    assert not any(isinstance(e, Chars) for e in events)


def test_n_choices_share_one_prefill_and_each_reproduces_alone() -> None:
    seed = [1, 2, 3, 4, 5, 6, 0, 1]

    async def go() -> tuple[list[Any], list[list[int]], list[tuple[int, int]]]:
        model = FakeModel(vocab=7)
        async with running_engine(model) as (engine, _):
            before = len(model.shapes)
            events = await events_of(engine, request(seed, max_new=12, temperature=3.0,
                                                     seed=11, n=4, stream=True))
            prefills = [s for s in model.shapes[before:] if s[1] == len(seed)]
            alone = [(await run_one(engine, request(seed, max_new=12, temperature=3.0,
                                                    seed=choice_seed(11, i)))).ids
                     for i in range(4)]
        return events, alone, prefills

    events, alone, prefills = run(go())
    assert prefills == [(1, len(seed))]  # one prefill of one row for the 4 choices
    got: dict[int, list[int]] = {i: [] for i in range(4)}
    finished = []
    for e in events:
        if isinstance(e, Chars):
            got[e.index] += e.ids
        elif isinstance(e, Finished):
            finished.append(e.index)
    assert sorted(finished) == [0, 1, 2, 3]
    assert [got[i] for i in range(4)] == alone
    assert len({tuple(x) for x in alone}) > 1  # the choices differ
    assert choice_seed(11, 0) == 11


def test_n_choices_take_n_rows_and_more_than_the_engine_has_is_refused() -> None:
    async def go() -> tuple[int, str]:
        async with running_engine(FakeModel(vocab=7), max_batch=4) as (engine, core):
            seen = 0

            async def watch() -> None:
                nonlocal seen
                while True:
                    seen = max(seen, core.active)
                    await asyncio.sleep(0)

            watcher = asyncio.ensure_future(watch())
            await run_one(engine, request([1, 2], max_new=300, n=3, temperature=1.0))
            watcher.cancel()
            with pytest.raises(RefusedError) as info:
                await run_one(engine, request([1, 2], max_new=3, n=5))
            return seen, info.value.message

    seen, message = run(go())
    assert seen == 3
    assert "n = 5 choices need more rows than this engine has (4)" in message


def test_cancelling_a_request_with_n_choices_frees_every_row() -> None:
    async def go() -> int:
        async with running_engine(FakeModel(vocab=7)) as (engine, core):
            gen = engine.generate(request([1, 2], max_new=100_000, n=5, stream=True))
            async for e in gen:
                if isinstance(e, Chars):
                    break
            await gen.aclose()
            for _ in range(200):
                if core.active == 0:
                    break
                await asyncio.sleep(0.01)
            return core.active

    assert run(go()) == 0


def test_a_request_with_n_choices_that_ends_in_its_prefill_ends_every_choice() -> None:
    async def go() -> list[Any]:
        async with running_engine(FakeModel(vocab=7)) as (engine, _):
            return await events_of(engine, request([1, 2, 3], max_new=0, n=3,
                                                   score=Scoring()))

    events = run(go())
    assert isinstance(events[0], Scored)
    assert sorted(e.index for e in events if isinstance(e, Finished)) == [0, 1, 2]


def test_scores_on_a_real_graph_equal_a_step_by_step_computation() -> None:
    model_dir = ROOT / "models" / "shakespeare"
    model = load_model(model_dir)
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n" * 4
    ids = model.vocab.encode(text).tolist()

    async def go() -> Scored:
        async with running_engine(model, prefill_chunk_chars=64) as (engine, _):
            events = await events_of(engine, request(ids, max_new=0, score=Scoring()))
        assert isinstance(events[0], Scored)
        return events[0]

    scored = run(go())
    want = stepwise(model_dir, text)
    assert np.max(np.abs(np.array(scored.logprobs) - want)) < 1e-4
    assert abs(sum(scored.logprobs) - sum(want)) < 1e-4
