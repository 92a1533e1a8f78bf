"""Properties of the pure parts (sampling, random numbers, stop strings, vocabulary), checked
with Hypothesis over any inputs the engine could hand them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.rng import row_keys, uniforms
from app.sampling import sample_next
from app.stops import StopMatcher
from app.vocab import UnknownCharactersError, Vocabulary
from tests.conftest import FULL

EXAMPLES = 2000 if FULL else 100
# deadline=None: the machine is shared, and a slow example is not a wrong one.
# The default run (CI) replays a fixed set of examples; the full run explores afresh.
props = settings(max_examples=EXAMPLES, deadline=None, derandomize=not FULL)

F32_MAX = float(np.finfo(np.float32).max)


# --- sampling ---------------------------------------------------------------------------------
@dataclass
class Batch:
    logits: npt.NDArray[np.float32]  # (B, V)
    temperature: npt.NDArray[np.float32]  # (B,)
    top_k: npt.NDArray[np.int64]  # (B,)
    top_p: npt.NDArray[np.float32]  # (B,)
    uniforms: npt.NDArray[np.float64]  # (B,), in [0, 1)

    def sample(self) -> npt.NDArray[np.int64]:
        return sample_next(self.logits, self.temperature, self.top_k, self.top_p, self.uniforms)

    def row(self, i: int) -> Batch:
        s = slice(i, i + 1)
        return Batch(self.logits[s], self.temperature[s], self.top_k[s], self.top_p[s],
                     self.uniforms[s])

    def rows(self, order: list[int]) -> Batch:
        idx = np.asarray(order, np.intp)
        return Batch(self.logits[idx], self.temperature[idx], self.top_k[idx], self.top_p[idx],
                     self.uniforms[idx])


# Any finite float32 logits, with some rows of equal values and some tiny differences.
finite_f32 = st.floats(-F32_MAX, F32_MAX, width=32, allow_nan=False, allow_infinity=False)
modest_f32 = st.floats(-30, 30, width=32)
temperatures = st.one_of(st.just(0.0), st.floats(0, 5, width=32),
                         st.floats(0, 2.0**-10, width=32))
# 0.0 is what the engine's float32 arrays make of a valid but tiny top_p such as 1e-50.
top_ps = st.one_of(st.just(1.0), st.just(0.0), st.floats(0, 1, exclude_min=True, width=32))
unit = st.floats(0, 1, exclude_max=True)


@st.composite
def batches(draw: st.DrawFn, max_rows: int = 6, max_vocab: int = 40) -> Batch:
    b = draw(st.integers(1, max_rows))
    v = draw(st.integers(1, max_vocab))
    logits = draw(hnp.arrays(np.float32, (b, v), elements=st.one_of(finite_f32, modest_f32)))
    return Batch(
        logits=logits,
        temperature=np.array(draw(st.lists(temperatures, min_size=b, max_size=b)), np.float32),
        top_k=np.array(draw(st.lists(st.integers(0, v + 3), min_size=b, max_size=b)), np.int64),
        top_p=np.array(draw(st.lists(top_ps, min_size=b, max_size=b)), np.float32),
        uniforms=np.array(draw(st.lists(unit, min_size=b, max_size=b)), np.float64),
    )


def probabilities(logits: npt.NDArray[np.float32], temperature: float) -> npt.NDArray[np.float64]:
    z = np.asarray(logits, np.float64) / temperature
    e = np.exp(z - z.max())
    out: npt.NDArray[np.float64] = e / e.sum()
    return out


@props
@given(batches())
def test_sampling_gives_one_valid_id_per_row(batch: Batch) -> None:
    ids = batch.sample()
    assert ids.dtype == np.int64
    assert ids.shape == (batch.logits.shape[0],)
    assert ((ids >= 0) & (ids < batch.logits.shape[1])).all()


@props
@given(batches())
def test_sampled_ids_are_never_outside_the_top_k(batch: Batch) -> None:
    ids = batch.sample()
    for i, tok in enumerate(ids):
        k = int(batch.top_k[i])
        t = float(batch.temperature[i])
        if k > 0 and t > 0:
            # Ranked by tempered probability: logits 0 and 4e-31 are one tie after exp().
            p = probabilities(batch.logits[i], t)
            kth_largest = np.sort(p)[::-1][min(k, len(p)) - 1]
            assert p[tok] >= kth_largest, (k, batch.logits[i], tok)


@props
@given(batches())
def test_sampled_ids_lie_in_the_top_p_nucleus(batch: Batch) -> None:
    ids = batch.sample()
    for i, tok in enumerate(ids):
        t = float(batch.temperature[i])
        if t == 0:
            continue
        p = probabilities(batch.logits[i], t)
        # The nucleus keeps an id while the mass of the ids before it is below top_p; ids that
        # tie with the chosen one may come before it, so count only the strictly likelier.
        mass_before = p[p > p[tok]].sum()
        assert mass_before < float(batch.top_p[i]) + 1e-6, (p, tok, batch.top_p[i])
        assert p[tok] > 0


@props
@given(batches())
def test_temperature_zero_is_argmax(batch: Batch) -> None:
    batch.temperature[:] = 0
    assert (batch.sample() == np.argmax(batch.logits, axis=-1)).all()


@props
@given(batches())
def test_the_same_uniforms_give_the_same_ids(batch: Batch) -> None:
    first = batch.sample()
    again = Batch(batch.logits.copy(), batch.temperature.copy(), batch.top_k.copy(),
                  batch.top_p.copy(), batch.uniforms.copy()).sample()
    assert (first == again).all()


@props
@given(batches(), st.data())
def test_a_rows_id_does_not_depend_on_the_other_rows(batch: Batch, data: st.DataObject) -> None:
    ids = batch.sample()
    for i in range(len(ids)):
        assert batch.row(i).sample()[0] == ids[i]
    order = data.draw(st.permutations(range(len(ids))))
    assert (batch.rows(order).sample() == ids[order]).all()


# --- random numbers ---------------------------------------------------------------------------
u64 = st.integers(0, 2**64 - 1)


@props
@given(st.lists(st.tuples(u64, u64), min_size=1, max_size=50))
def test_uniforms_are_in_unit_interval_reproducible_and_per_row(
        pairs: list[tuple[int, int]]) -> None:
    keys = np.array([k for k, _ in pairs], np.uint64)
    counters = np.array([c for _, c in pairs], np.uint64)
    u = uniforms(keys, counters)
    assert u.dtype == np.float64
    assert ((u >= 0) & (u < 1)).all()
    assert (uniforms(keys.copy(), counters.copy()) == u).all()
    for i in range(len(pairs)):
        assert uniforms(keys[i:i + 1], counters[i:i + 1])[0] == u[i]


@props
@given(st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=50))
def test_row_keys_take_any_seed_and_are_reproducible(seeds: list[int]) -> None:
    keys = row_keys(seeds)
    assert keys.dtype == np.uint64
    assert (row_keys(list(seeds)) == keys).all()
    assert [int(row_keys([s])[0]) for s in seeds] == [int(k) for k in keys]


# --- stop strings -----------------------------------------------------------------------------
ALPHABET = "ab\nc"  # few letters, so stops really occur in random text
texts = st.text(ALPHABET, max_size=80)
stop_lists = st.lists(st.text(ALPHABET, min_size=1, max_size=6), min_size=1, max_size=4)


def expected_cut(text: str, stops: list[str]) -> int | None:
    """Where the reply ends: the start of the stop that completes first (the longest if
    several complete on the same character); None if no stop occurs."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    if not ends:
        return None
    end = min(ends)
    return end - max(len(s) for s in stops if text[:end].endswith(s))


@dataclass
class Fed:
    emitted: str
    stopped: bool
    chunks: list[str]  # what a reader saw, read at arbitrary moments
    most_held: int


def feed(text: str, stops: list[str], reads: list[bool] | None = None) -> Fed:
    """Push text char by char; a reader takes everything emitted so far after each push where
    `reads` says so (and at the end)."""
    matcher: StopMatcher[str] = StopMatcher([list(s) for s in stops])
    emitted: list[str] = []
    chunks: list[str] = []
    sent = 0
    most_held = 0
    stopped = False
    for n, ch in enumerate(text, 1):
        out, stopped = matcher.push(ch)
        emitted.extend(out)
        if not stopped:
            most_held = max(most_held, n - len(emitted))
        if reads is not None and reads[(n - 1) % len(reads)] and len(emitted) > sent:
            chunks.append("".join(emitted[sent:]))
            sent = len(emitted)
        if stopped:
            break
    if len(emitted) > sent:
        chunks.append("".join(emitted[sent:]))
    return Fed("".join(emitted), stopped, chunks, most_held)


@props
@given(texts, stop_lists)
def test_emitted_text_never_contains_a_stop_and_ends_where_the_first_stop_starts(
        text: str, stops: list[str]) -> None:
    fed = feed(text, stops)
    assert not any(s in fed.emitted for s in stops)
    cut = expected_cut(text, stops)
    assert fed.stopped == (cut is not None)
    if cut is not None:
        assert fed.emitted == text[:cut]


@props
@given(texts, stop_lists)
def test_at_most_the_longest_stop_minus_one_is_held_back(text: str, stops: list[str]) -> None:
    assert feed(text, stops).most_held <= max(len(s) for s in stops) - 1


@props
@given(texts, stop_lists)
def test_flush_releases_the_whole_text_when_no_stop_occurs(text: str, stops: list[str]) -> None:
    matcher: StopMatcher[str] = StopMatcher([list(s) for s in stops])
    out: list[str] = []
    for ch in text:
        emit, stopped = matcher.push(ch)
        out.extend(emit)
        if stopped:
            break
    else:
        out.extend(matcher.flush())
        assert "".join(out) == text
        return
    assert any(s in text for s in stops)


@props
@given(texts, stop_lists, st.lists(st.booleans(), min_size=1, max_size=10))
def test_a_reader_taking_chunks_at_any_moment_never_sees_a_stop(
        text: str, stops: list[str], reads: list[bool]) -> None:
    fed = feed(text, stops, reads)
    assert "".join(fed.chunks) == fed.emitted
    shown = ""
    for chunk in fed.chunks:
        shown += chunk
        assert not any(s in shown for s in stops)
        assert fed.emitted.startswith(shown)  # nothing shown is ever taken back


@props
@given(texts)
def test_without_stops_every_token_passes_straight_through(text: str) -> None:
    matcher: StopMatcher[str] = StopMatcher([])
    for ch in text:
        assert matcher.push(ch) == ([ch], False)


# --- vocabulary -------------------------------------------------------------------------------
alphabets = st.lists(st.characters(), min_size=1, max_size=60, unique=True)


@props
@given(alphabets, st.data())
def test_vocabulary_round_trips_any_text_over_its_alphabet(
        chars: list[str], data: st.DataObject) -> None:
    vocab = Vocabulary(chars)
    text = data.draw(st.text(st.sampled_from(chars), max_size=200))
    ids = vocab.encode(text)
    assert ids.dtype == np.int32
    assert ((ids >= 0) & (ids < len(vocab))).all()
    assert vocab.decode(ids) == text
    assert vocab.decode(ids.tolist()) == text


@props
@given(st.lists(st.text(max_size=50), max_size=5))
def test_vocabulary_from_text_is_sorted_and_covers_the_text(texts_: list[str]) -> None:
    if not "".join(texts_):
        return  # an empty vocabulary is refused (tests/test_vocab.py)
    vocab = Vocabulary.from_text(texts_)
    assert vocab.chars == sorted(set("".join(texts_)))
    for t in texts_:
        assert vocab.decode(vocab.encode(t)) == t


@props
@given(alphabets, st.data())
def test_unknown_characters_are_named_in_order_of_appearance(
        chars: list[str], data: st.DataObject) -> None:
    vocab = Vocabulary(chars)
    text = data.draw(st.text(min_size=1, max_size=60))
    unknown = list(dict.fromkeys(c for c in text if c not in chars))
    assert vocab.unknown(text) == unknown
    if not unknown:
        assert vocab.decode(vocab.encode(text)) == text
        return
    with pytest.raises(UnknownCharactersError) as err:
        vocab.encode(text)
    assert err.value.chars == unknown
    for c in unknown[:20]:
        assert repr(c) in str(err.value)
    if len(unknown) > 20:
        assert f"and {len(unknown) - 20} more" in str(err.value)


@props
@given(alphabets, st.text(max_size=40))
def test_characters_refused_after_lowercasing_are_named_as_sent(chars: list[str],
                                                                 sent: str) -> None:
    vocab = Vocabulary(chars)
    named = vocab.unknown_lowercased(sent)
    missing = vocab.unknown(sent.lower())
    assert bool(named) == bool(missing)
    for c in named:  # a character the caller sent, or one only lowercasing made
        assert c in sent or c in missing
    for m in missing:  # each missing character is accounted for by a named one
        assert m in named or any(m in c.lower() for c in named if c in sent)
    assert len(named) == len(set(named))


def test_a_character_that_lowercases_to_two_is_named_as_sent() -> None:
    vocab = Vocabulary(sorted("abcdefghijklmnopqrstuvwxyz "))
    assert vocab.unknown("\u0130stanbul".lower()) == ["\u0307"]
    assert vocab.unknown_lowercased("\u0130stanbul") == ["\u0130"]
    assert vocab.unknown_lowercased("ISTANBUL") == []


def test_top_p_of_one_keeps_the_far_tail_in_a_mixed_batch() -> None:
    """Found by the 2000-example run: beside a row with top_p < 1, a row with top_p = 1 lost
    ids whose preceding mass rounded to 1.0, so it sampled differently than alone."""
    batch = Batch(logits=np.array([[0, 19], [0, 0]], np.float32),
                  temperature=np.array([0.5, 0], np.float32), top_k=np.array([0, 0]),
                  top_p=np.array([1, 0.5], np.float32), uniforms=np.array([0.0, 0.0]))
    assert batch.sample()[0] == batch.row(0).sample()[0] == 0


@pytest.mark.parametrize("top_p", [1e-50, 1e-40, 1e-6])
def test_a_tiny_top_p_keeps_the_likeliest_id(top_p: float) -> None:
    """Issue 11, defect 7: top_p = 1e-50 became 0 in float32, the nucleus kept nothing and the
    fallback answered id 0 (a newline, in every model) instead of the likeliest id."""
    logits = np.array([[0.0, 3.0, 1.0], [2.0, -1.0, 0.5]], np.float32)
    batch = Batch(logits=logits, temperature=np.array([1.0, 0.7], np.float32),
                  top_k=np.array([0, 0]), top_p=np.array([top_p, top_p], np.float32),
                  uniforms=np.array([0.5, 0.99]))
    assert list(batch.sample()) == [1, 0]
    assert batch.row(0).sample()[0] == 1
