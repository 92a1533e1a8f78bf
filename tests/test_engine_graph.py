"""The engine driving decode graphs (issue 13): K ids per row per onnxruntime call, sampled in
the graph, must give what the host-sampling engine gives: the same ids, finish reasons, random
stream positions and details, whatever the parameters, stops, batch and prefill around it, and a
resumable row that ends inside a block must continue exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.decode import DecodeGraphs, serving_decode_graphs
from app.engine.batch import Sequence
from app.engine.core import EngineCore
from app.engine.messages import GenerationRequest
from app.runtime import OnnxModel, RuntimeOptions, load_model
from tests.fakes import request, run_core


@pytest.fixture(scope="module")
def model(tiny_models: Path) -> OnnxModel:
    return load_model(tiny_models / "tiny", RuntimeOptions(device="cpu"))


@pytest.fixture(scope="module")
def graphs(model: OnnxModel) -> DecodeGraphs:
    g = serving_decode_graphs(model, 8)
    assert g is not None  # export writes K = 1 and K = 8
    assert (g.steps.steps, g.single.steps if g.single else None) == (8, 1)
    return g


run = run_core


def varied(model: OnnxModel, i: int, **kw: Any) -> GenerationRequest:
    """Greedy, temperature, top-k, top-p, stops, details; lengths that are not multiples of K."""
    p: dict[str, Any] = dict(
        seed_ids=model.vocab.encode("ROMEO:\n" * (1 + i % 3)), max_new=1 + 9 * i,
        temperature=[0.0, 0.7, 1.0, 1.5][i % 4], top_k=[0, 3, 0, 10][i % 4],
        top_p=[1.0, 1e-50, 0.9, 0.5][i % 4], seed=i, details=i % 5 == 0,
        stop=[model.vocab.encode("e ").tolist()] if i % 3 == 0 else [])
    p.update(kw)
    return request(p.pop("seed_ids"), **p)


def test_the_graph_engine_gives_the_host_engines_ids_reasons_and_details(
        model: OnnxModel, graphs: DecodeGraphs) -> None:
    # 16 rows for 24 requests and 7-character prefill slices: rows join and leave mid-run,
    # seeds prefill beside running rows (the K = 1 graph runs then).
    params = [varied(model, i) for i in range(24)]
    host = run(model, None, params, max_batch=16, prefill_chunk_chars=7)
    graph = run(model, graphs, params, max_batch=16, prefill_chunk_chars=7)
    reasons = {s.finish_reason for s in host}
    assert reasons == {"length", "stop"}
    for h, g in zip(host, graph, strict=True):
        assert g.ids == h.ids
        assert (g.finish_reason, g.sampled) == (h.finish_reason, h.sampled)
        assert len(g.details) == len(h.details)
        for a, b in zip(g.details, h.details, strict=True):
            assert a[0] == pytest.approx(b[0], abs=1e-6)
            assert [t for t, _ in a[1]] == [t for t, _ in b[1]]


def test_a_seeded_request_is_the_same_alone_and_in_a_crowd_with_prefill(
        model: OnnxModel, graphs: DecodeGraphs) -> None:
    mine = varied(model, 2, max_new=150)
    alone = run(model, graphs, [mine])[0]
    crowd = [varied(model, 40 + i, seed_ids=model.vocab.encode("KING:" * (i + 1) * 20))
             for i in range(10)]
    # Submitted first, so it decodes while the crowd's long seeds prefill (K = 1 calls) and
    # after (K = 8 calls).
    beside = run(model, graphs, [mine, *crowd], prefill_chunk_chars=16)[0]
    assert beside.ids == alone.ids
    assert len(alone.ids) == 150


@pytest.mark.parametrize("first", [1, 8, 9, 37])
def test_a_resumable_row_ending_inside_a_block_continues_exactly(
        model: OnnxModel, graphs: DecodeGraphs, first: int) -> None:
    """1: ends on its host-sampled first id; 9: on a block's last id (the call's own state);
    8 and 37: inside a block (state replayed). Sampled at temperature 1 with top-p 0.9."""
    straight = run(model, graphs, [varied(model, 2, max_new=first + 50)])[0]
    head = run(model, graphs, [varied(model, 2, max_new=first, resumable=True)])[0]
    assert head.final is not None
    states, last, sampled = head.final.states, head.final.last_id, head.final.counter
    assert (last, sampled) == (head.ids[-1], first)
    tail = run(model, graphs, [varied(model, 2, seed_ids=np.array([last], np.int32),
                                      initial_states=states, counter_start=sampled,
                                      max_new=50)])[0]
    assert head.ids + tail.ids == straight.ids
    assert len(set(straight.ids)) > 5  # really sampled


def test_rows_advance_k_ids_per_call_and_one_while_a_seed_prefills(
        model: OnnxModel, graphs: DecodeGraphs) -> None:
    core = EngineCore(model, decode=graphs, prefill_chunk_chars=10)
    running = Sequence(varied(model, 1, max_new=200, seed_ids=model.vocab.encode("ROMEO:")))
    core.submit(running)
    core.iterate()  # prefill and the first id (host), then one K = 8 call
    assert len(running.ids) == 1 + 8
    core.submit(Sequence(varied(model, 2, seed_ids=model.vocab.encode("A" * 35))))
    seen = []
    for _ in range(4):  # the 35-character seed takes 4 slices of 10
        before = len(running.ids)
        core.iterate()
        seen.append(len(running.ids) - before)
    assert seen == [1, 1, 1, 8]  # K = 1 while the seed has slices left, K again after


def test_decode_graphs_are_chosen_by_k_and_0_means_host(
        model: OnnxModel) -> None:
    assert serving_decode_graphs(model, 0) is None
    assert serving_decode_graphs(model, 4) is None  # not listed: host sampling, logged
    one = serving_decode_graphs(model, 1)
    assert one is not None
    assert one.steps.steps == 1
    assert one.single is None
    core = EngineCore(model, decode=serving_decode_graphs(model, 8))
    assert core.graph_files == "model.onnx + decode.k8.onnx"
    core.policy.calibrate(repeats=1)
    assert core.policy.step_fixed_s > 0


def test_constrained_and_biased_rows_give_the_host_engines_ids_beside_free_ones(
        model: OnnxModel, graphs: DecodeGraphs) -> None:
    """Rows with a constraint or a logit_bias sample on the host (the graph has no masks): the
    graph engine decodes on the host while one is in the batch and returns to its K-step graph
    after, and every row, shaped or free, gets the host engine's ids."""
    from app.constraints import ConstraintSpec, compile_constraint

    words = compile_constraint(ConstraintSpec.of("regex", r"[A-Z][a-z]+( [a-z]+){1,6}\."),
                               model.vocab.chars).constraint
    e = int(model.vocab.encode("e")[0])
    params = [varied(model, i, constraint=words if i % 2 == 0 else None,
                     logit_bias=((e, -100.0),) if i % 4 == 1 else ()) for i in range(24)]
    host = run(model, None, params, max_batch=16, prefill_chunk_chars=7)
    graph = run(model, graphs, params, max_batch=16, prefill_chunk_chars=7)
    for i, (h, g) in enumerate(zip(host, graph, strict=True)):
        assert g.ids == h.ids
        assert (g.finish_reason, g.sampled) == (h.finish_reason, h.sampled)
        if i % 4 == 1:
            assert e not in h.ids
    assert any(h.finish_reason == "stop" and h.req.constraint is not None for h in host)
