from __future__ import annotations

import numpy as np
import pytest

from app.vocab import UnknownCharactersError, Vocabulary, VocabularyError


def test_vocabulary_round_trips_text() -> None:
    text = "To be, or not to be:\nthat is the question."
    vocab = Vocabulary.from_text([text])
    assert vocab.chars == sorted(set(text))
    ids = vocab.encode(text)
    assert ids.dtype == np.int32
    assert vocab.decode(ids) == text


def test_unknown_characters_are_named() -> None:
    vocab = Vocabulary.from_text(["abc"])
    with pytest.raises(UnknownCharactersError) as err:
        vocab.encode("abzyz")
    assert err.value.chars == ["z", "y"]
    assert "'z'" in str(err.value)
    assert "'y'" in str(err.value)


def test_duplicates_and_multichar_entries_are_refused() -> None:
    with pytest.raises(VocabularyError, match="duplicate"):
        Vocabulary(["a", "b", "a"])
    with pytest.raises(VocabularyError, match="single characters"):
        Vocabulary(["a", "bc"])
    with pytest.raises(VocabularyError, match="empty"):
        Vocabulary([])


def test_difference_lists_both_sides() -> None:
    assert Vocabulary(["a", "b", "c"]).difference(Vocabulary(["b", "c", "d"])) == (["a"], ["d"])
