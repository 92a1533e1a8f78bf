"""Character vocabulary: the one mapping between text and model ids.

It travels inside every artifact (`model.json`), so the service never guesses
which id a character has; training and serving both use this class.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

Normalization = Literal["NFC", "NFKC"]
NORMALIZATIONS: tuple[Normalization, ...] = ("NFC", "NFKC")


def normalize(text: str, form: str | None) -> str:
    """`text` in the Unicode normalisation form a model was trained with (model.json
    `normalization`; None: the text as it is). Training applies it to the corpus after any
    lowercasing, and the service to seeds and stop strings the same way, so "ế" typed
    precomposed (U+1EBF) and "ê" + U+0301 reach an NFC model as the same character."""
    if form is None:
        return text
    if form not in NORMALIZATIONS:
        raise ValueError(f"normalisation must be one of {', '.join(NORMALIZATIONS)} or none, "
                         f"got {form!r}")
    return unicodedata.normalize(form, text)


class VocabularyError(ValueError):
    """A vocabulary that cannot be used (duplicates, empty, multi-char entries)."""


class UnknownCharactersError(ValueError):
    """Text holds characters that the vocabulary does not know."""

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = list(chars)
        shown = ", ".join(repr(c) for c in self.chars[:20])
        more = f" and {len(self.chars) - 20} more" if len(self.chars) > 20 else ""
        super().__init__(f"characters not in the model's vocabulary: {shown}{more}")


class Vocabulary:
    """Sorted characters; a character's id is its index."""

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        if not chars:
            raise VocabularyError("vocabulary is empty")
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise VocabularyError(f"vocabulary entries must be single characters, got {bad[:5]!r}")
        dupes = sorted(c for c, n in Counter(chars).items() if n > 1)
        if dupes:
            raise VocabularyError(f"vocabulary has duplicate characters: {dupes!r}")
        self.chars: list[str] = chars
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, texts: Iterable[str]) -> Vocabulary:
        found: set[str] = set()
        for text in texts:
            found.update(text)
        return cls(sorted(found))

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.chars == other.chars

    def __hash__(self) -> int:
        return hash(tuple(self.chars))

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` missing from the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(c for c in text if c not in self._index))

    def unknown_lowercased(self, sent: str) -> list[str]:
        """The characters of `sent` that make `sent.lower()` unspellable, named as the caller
        sent them: 'İ' lowercases to 'i' + U+0307, and U+0307 is not what the caller typed.
        A lowercased character that no single sent character gives (a final 'ς', which 'Σ'
        becomes only at the end of a word) is named as it is."""
        missing = self.unknown(sent.lower())
        if not missing:
            return []
        bad = set(missing)
        named = [c for c in dict.fromkeys(sent) if any(low in bad for low in c.lower())]
        covered = {low for c in named for low in c.lower()}
        return named + [m for m in missing if m not in covered]

    def encode(self, text: str) -> npt.NDArray[np.int32]:
        missing = self.unknown(text)
        if missing:
            raise UnknownCharactersError(missing)
        return np.fromiter((self._index[c] for c in text), dtype=np.int32, count=len(text))

    def decode(self, ids: Iterable[int]) -> str:
        # On the hot path (every SSE event): map, not a generator of int() calls; an index
        # works for Python and numpy integers alike.
        return "".join(map(self.chars.__getitem__, ids))

    def difference(self, other: Vocabulary) -> tuple[list[str], list[str]]:
        """(characters only in self, characters only in other)."""
        mine, theirs = set(self.chars), set(other.chars)
        return sorted(mine - theirs), sorted(theirs - mine)
