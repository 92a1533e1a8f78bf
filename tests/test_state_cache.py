"""The exact state cache (issue 14): same text with and without it, hits counted, bytes bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.engine.batch import Sequence
from app.engine.cache import StateCache, prefix_digests
from app.engine.core import EngineCore
from app.runtime import RuntimeOptions, load_model
from tests.fakes import FakeModel, request


def run_all(core: EngineCore, seqs: list[Sequence]) -> list[list[int]]:
    for s in seqs:
        core.submit(s)
    while core.has_work:
        core.iterate()
    return [s.ids for s in seqs]


def test_cached_prefixes_give_the_same_text_and_skip_their_prefill(tiny_models: Path) -> None:
    model = load_model(tiny_models / "tiny", RuntimeOptions(device="cpu"))
    base = ("ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 40)[:2000]
    seeds = [base, base + " It is the east", base[:1500], base]

    def generate(cache_bytes: int) -> tuple[list[list[int]], EngineCore, list[Sequence]]:
        core = EngineCore(model, prefill_chunk_chars=256, state_cache_bytes=cache_bytes)
        out: list[list[int]] = []
        seqs = []
        for i, text in enumerate(seeds):  # one after another: each can use the ones before
            s = Sequence(request(model.vocab.encode(text), max_new=80, temperature=0.9,
                                 seed=11 + i))
            seqs.append(s)
            out += run_all(core, [s])
        return out, core, seqs

    without, _, _ = generate(0)
    with_cache, core, seqs = generate(1 << 20)
    assert with_cache == without
    cache = core.cache
    assert cache is not None
    # States are kept every 256 characters (the prefill slice) and at each seed's end. The
    # second seed extends the first (cached up to 1792 = 7 x 256); the third is a prefix of
    # it (cached up to 1280); the fourth is the first again, whole.
    assert cache.hits == 3
    assert cache.misses == 1
    assert cache.chars_saved == 1792 + 1280 + 2000
    assert seqs[3].prefill_s == 0.0  # no graph call for a seed cached whole
    assert seqs[0].prefill_s > 0.0


def test_the_cache_stays_within_its_byte_budget_under_many_seeds() -> None:
    model = FakeModel(vocab=7)
    budget = 20_000
    core = EngineCore(model, state_cache_bytes=budget)
    rng = np.random.default_rng(0)
    seqs = [Sequence(request(rng.integers(0, 7, 300), max_new=2, temperature=0.0))
            for _ in range(200)]
    run_all(core, seqs)
    cache = core.cache
    assert cache is not None
    assert 0 < cache.bytes <= budget
    assert sum(e.nbytes for e in cache.entries.values()) == cache.bytes
    assert len(cache.entries) < 200 * 2  # 256 and the end of each seed: evicted, oldest first


def test_lookup_prefers_the_longest_cached_prefix() -> None:
    cache = StateCache(1 << 20)
    ids = np.arange(200, dtype=np.int32) % 50
    digests = prefix_digests(ids, 64)
    assert sorted(digests) == [64, 128, 192, 200]
    logits = np.zeros(50, np.float32)
    cache.store(digests[64], np.zeros((1, 4), np.float32), logits)
    cache.store(digests[192], np.ones((1, 4), np.float32), logits)
    length, entry = cache.lookup(digests)
    assert length == 192
    assert entry is not None
    assert float(entry.states.sum()) == 4.0
    other = prefix_digests(np.concatenate([ids[:100], ids[:100] + 1]).astype(np.int32), 64)
    assert cache.lookup(other)[0] == 64  # shares only the first 64 characters
