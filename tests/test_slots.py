"""Fixed state slots (app/slots.py) give exactly what today's select/concat batch gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.decode import block_uniforms, load_decode_graph
from app.runtime import OnnxModel, RuntimeOptions, load_model
from app.slots import SlotsFullError, SlotStates, decode_slots, step_slots
from training.decode_artifact import check_rows

CPU = RuntimeOptions(device="cpu")
# step -> (requests joining, requests leaving); requests are numbered by arrival
SCHEDULE = {0: ([0, 1, 2], []), 2: ([3], []), 3: ([], [1]), 4: ([4, 5], []),
            6: ([], [0, 3]), 7: ([6], []), 9: ([], [2, 5])}
STEPS = 11


@pytest.fixture(scope="module")
def tiny(tiny_models: Path) -> OnnxModel:
    return load_model(tiny_models / "tiny", CPU)


def seed_ids(model: OnnxModel, req: int) -> np.ndarray:
    rng = np.random.default_rng(100 + req)
    return rng.integers(0, len(model.vocab), (1, 5 + req % 3)).astype(np.int32)


def test_slot_join_and_leave_equal_select_and_concat(tiny: OnnxModel) -> None:
    """The engine's batch life (prefill, greedy steps, joins, leaves) on both paths; every
    row's logits and state must be bit-identical at every step."""
    model = tiny
    order: list[int] = []  # active requests in batch order, the same on both paths
    batch = model.zero_states(0)  # today's path: one StateBatch for the whole batch
    slots = SlotStates(model.state_sizes, capacity=8)
    slot_of: dict[int, int] = {}
    last: dict[int, int] = {}  # next id each request feeds
    used_slots: set[int] = set()
    for t in range(STEPS):
        joining, leaving = SCHEDULE.get(t, ([], []))
        if leaving:
            keep = np.array([i for i, r in enumerate(order) if r not in leaving], np.intp)
            batch = model.select(batch, keep)
            slots.leave(np.array([slot_of.pop(r) for r in leaving], np.intp))
            order = [order[i] for i in keep]
        for r in joining:
            logits, prefilled = model.step(seed_ids(model, r), model.zero_states(1))
            batch = model.concat([batch, prefilled])
            slot_of[r] = int(slots.join(prefilled.host())[0])
            used_slots.add(slot_of[r])
            order.append(r)
            last[r] = int(logits[0, -1].argmax())
        ids = np.array([[last[r]] for r in order], np.int32)  # (B, 1)
        rows = np.array([slot_of[r] for r in order], np.intp)
        want_logits, batch = model.step(ids, batch)
        got_logits = step_slots(model, slots, rows, ids)
        np.testing.assert_array_equal(got_logits, want_logits)
        for want, got in zip(batch.host(), slots.read(rows), strict=True):
            np.testing.assert_array_equal(got, want)
        for i, r in enumerate(order):
            last[r] = int(want_logits[i, -1].argmax())
    assert slots.active == len(order) == 2
    assert len(used_slots) < 7  # slots were reused after leaves, not just appended


def test_decode_graph_on_slots_equals_decode_graph_on_a_compacted_batch(
        tiny: OnnxModel, tiny_models: Path) -> None:
    graph = load_decode_graph(tiny_models / "tiny", 8, options=CPU)
    p = check_rows(tiny.meta, 6, seed=3)
    _, prefilled = tiny.run_numpy(p["prime"], [np.zeros((6, n), np.float32)
                                               for n in tiny.state_sizes])
    slots = SlotStates(tiny.state_sizes, capacity=6)
    joined = slots.join(prefilled)
    slots.leave(joined[[1, 4]])  # rows 1 and 4 leave; the rest keep their slots
    keep = np.array([0, 2, 3, 5], np.intp)
    u = block_uniforms(p["keys"][keep], np.zeros(4, np.uint64), 8)
    args = (p["temperature"][keep], p["top_k"][keep], p["top_p"][keep], u)
    got = decode_slots(graph, slots, joined[keep], p["ids"][keep], *args)
    want = graph.run(p["ids"][keep], [s[keep] for s in prefilled], *args)
    np.testing.assert_array_equal(got.ids, want.ids)
    for a, b in zip(slots.read(joined[keep]), want.states, strict=True):
        np.testing.assert_array_equal(a, b)


def test_slots_refuse_overfilling_and_double_leaves() -> None:
    slots = SlotStates([3, 3], capacity=4)
    first = slots.join([np.ones((3, 3), np.float32)] * 2)
    assert first.tolist() == [0, 1, 2]
    with pytest.raises(SlotsFullError, match="2 rows cannot join: 1 of 4 slots are free"):
        slots.join([np.ones((2, 3), np.float32)] * 2)
    slots.leave(first[1:2])
    with pytest.raises(ValueError, match=r"slots \[1\] are not in use"):
        slots.leave(first[1:2])
    assert slots.join([np.full((1, 3), 7, np.float32)] * 2).tolist() == [1]  # lowest free


def test_reading_a_packed_run_of_slots_copies_nothing() -> None:
    slots = SlotStates([4], capacity=8)
    joined = slots.join([np.arange(20, dtype=np.float32).reshape(5, 4)])
    (packed,) = slots.read(joined[1:4])
    assert np.shares_memory(packed, slots.tensors[0])
    (scattered,) = slots.read(np.array([3, 0], np.intp))
    assert not np.shares_memory(scattered, slots.tensors[0])
    np.testing.assert_array_equal(scattered, [[12, 13, 14, 15], [0, 1, 2, 3]])
