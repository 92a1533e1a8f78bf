"""app/graphemes.py: text pushed in any pieces comes out whole, cut only between grapheme
clusters of the whole text, and held back no longer than the last cluster."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.artifact import read_metadata
from app.graphemes import ClusterBuffer, can_join, cluster_boundaries
from tests.conftest import FULL, ROOT
from tests.modelgen import UNICODE_VOCAB

# The unicode model's vocabulary, with the pieces that join clusters drawn more often.
JOINERS = ["\u0301", "\u0308", "\u0323", "\u200d", "\ufe0f", "\U0001f3fd", "\U0001f1eb",
           "\U0001f1f7", "\r", "\n"]
CHARS = st.one_of(st.sampled_from(UNICODE_VOCAB), st.sampled_from(JOINERS))
TEXT = st.text(CHARS, max_size=80)
# As tests/test_properties.py: no deadline on shared cores; a fixed set of examples unless
# CHARLSTM_FULL=1.
props = settings(max_examples=2000 if FULL else 100, deadline=None, derandomize=not FULL)


def pieces_of(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def run(buf: ClusterBuffer, pieces: list[str]) -> list[str]:
    out = [buf.push(p) for p in pieces]
    out.append(buf.flush())
    return out


@props
@given(TEXT, st.lists(st.integers(0, 1000), max_size=20))
def test_pieces_concatenate_to_the_text_and_cut_only_between_clusters(
        text: str, cuts: list[int]) -> None:
    out = run(ClusterBuffer(), pieces_of(text, cuts))
    assert "".join(out) == text
    boundaries = set(cluster_boundaries(text))
    offset = 0
    for piece in out:
        offset += len(piece)
        assert offset in boundaries, (text, out)


@props
@given(TEXT, st.lists(st.integers(0, 1000), max_size=20))
def test_only_the_last_cluster_is_held(text: str, cuts: list[int]) -> None:
    buf = ClusterBuffer()
    sent = ""
    for piece in pieces_of(text, cuts):
        sent += buf.push(piece)
        so_far = sent + buf.held
        last = so_far[cluster_boundaries(so_far)[-2]:] if so_far else ""
        assert buf.held in ("", last)
        assert buf.held != last or not last.endswith("\n")


@props
@given(st.text(CHARS, max_size=60), st.lists(st.integers(0, 1000), max_size=20),
       st.integers(1, 4))
def test_a_cluster_longer_than_max_hold_is_sent_as_it_grows(text: str, cuts: list[int],
                                                           max_hold: int) -> None:
    buf = ClusterBuffer(max_hold=max_hold)
    out = []
    for piece in pieces_of(text, cuts):
        out.append(buf.push(piece))
        assert len(buf.held) <= max_hold
    out.append(buf.flush())
    assert "".join(out) == text


@pytest.mark.parametrize(("pieces", "want"), [
    (["e", "\u0301", "x"], ["", "", "e\u0301"]),  # the mark joins the letter before it
    (["👨\u200d", "👩\u200d", "👧", " "], ["", "", "", "👨\u200d👩\u200d👧"]),
    (["🇫", "🇷", "🇫", "🇷"], ["", "", "🇫🇷", ""]),  # a flag is a pair of regional indicators
    (["👍", "\U0001f3fd", "\ufe0f", "a"], ["", "", "", "👍\U0001f3fd\ufe0f"]),
    (["a\r", "\n", "b"], ["a", "\r\n", ""]),  # CR waits for its LF; LF ends a cluster at once
    (["ab\u2028", "\x1b"], ["ab\u2028", "\x1b"]),  # so do controls
])
def test_examples(pieces: list[str], want: list[str]) -> None:
    buf = ClusterBuffer()
    assert [buf.push(p) for p in pieces] == want
    assert "".join(want) + buf.flush() == "".join(pieces)


def test_zalgo_is_not_held_until_the_end() -> None:
    buf = ClusterBuffer(max_hold=8)
    sent = "".join(buf.push(c) for c in "a" + "\u0301" * 100)
    assert len(sent) >= 93
    assert sent + buf.flush() == "a" + "\u0301" * 100


@props
@given(st.text(st.characters(blacklist_categories=["Cs"]), max_size=60))
def test_text_without_joining_code_points_breaks_between_every_two(text: str) -> None:
    """What lets a plain vocabulary (the bundled models') skip the holdback altogether."""
    if can_join(text):
        return
    assert cluster_boundaries(text) == list(range(len(text) + 1))


def test_the_joining_code_points_are_known() -> None:
    for c in ["\u0301", "\u200d", "\ufe0f", "\U0001f3fd", "\r", "🇫", "\u1100", "\u0903"]:
        assert can_join([c]), repr(c)
    assert not can_join("abc XYZ\n\t.,;:!?'-\u2028\x00\x1b😀")
    assert not can_join(read_metadata(ROOT / "models" / "shakespeare").vocab)
    assert can_join(UNICODE_VOCAB)
