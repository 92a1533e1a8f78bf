"""Stream text in whole grapheme clusters: what a reader sees as one character.

The model produces code points one at a time, and a stream event that ends after "e" when the
next code point is U+0301 (combining acute) shows a bare "e", then an accent on nothing; likewise
half a ZWJ family, a lone regional indicator of a flag, an emoji before its skin tone or VS16,
or CR before its LF. `ClusterBuffer` sits between the characters generated and the events sent:

    buf = ClusterBuffer()
    for chars in generated:            # any split of the text, code points in order
        send(buf.push(chars))          # "" when nothing is safe to send yet
    send(buf.flush())                  # at the end of the generation, whatever is held

- `push(text) -> str` returns the longest prefix of everything pushed but not yet returned that
  ends on an extended grapheme cluster boundary (Unicode UAX #29) no later character can move:
  everything except the last cluster, which the next code point may still extend (combining
  mark, ZWJ, VS16, skin tone, a second regional indicator, LF after CR). A last cluster that
  nothing can extend (one ending in LF or a control such as U+2028, NUL or ESC) is returned at
  once, so a line ends in the stream when it ends in the text.
- `flush() -> str` returns what is held and empties the buffer (reusable afterwards).
- The pieces returned, in order, concatenate to exactly the text pushed; none begins or ends
  inside a cluster of the whole text, except past `max_hold`: a cluster longer than `max_hold`
  code points (Zalgo text: a letter with a hundred combining marks) is sent as it grows rather
  than held until the generation ends, so a stream never stalls on one cluster.
- `held` is the text held back (at most one cluster, at most `max_hold` code points).
- Counting: every returned piece is whole code points, `len(piece)` of them, in order, so
  per-character data (the `details` of each character) splits alongside by taking the next
  `len(piece)` entries.

Segmentation is the `regex` module's `\\X` (extended grapheme clusters, kept current with
Unicode); the boundaries before the last cluster of a text depend only on the code points up
to them, which is why holding one cluster back is enough.
"""

from __future__ import annotations

from collections.abc import Iterable

import regex

_CLUSTER = regex.compile(r"\X")
# A cluster ending in one of these is complete: UAX #29 breaks after LF and Control (GB4); CR
# is not here, since LF may still join it (GB3).
_ENDS_CLUSTER = regex.compile(r"[\n\p{Grapheme_Cluster_Break=Control}]")
# Unicode's Stream-Safe Text Format allows 30 non-starters in a row; 32 code points hold every
# cluster of real text (the longest emoji ZWJ sequences are 10).
MAX_HOLD = 32


class ClusterBuffer:
    """Text in, in any pieces; text out, cut only between grapheme clusters (see the module)."""

    def __init__(self, max_hold: int = MAX_HOLD) -> None:
        if max_hold < 1:
            raise ValueError(f"max_hold must be >= 1, got {max_hold}")
        self.max_hold = max_hold
        self._held = ""

    @property
    def held(self) -> str:
        return self._held

    def push(self, text: str) -> str:
        """The part of the text so far that is safe to send now (maybe "")."""
        pending = self._held + text
        if not pending:
            return ""
        last = _last_cluster_start(pending)
        if _ENDS_CLUSTER.fullmatch(pending[-1]) or len(pending) - last > self.max_hold:
            last = len(pending)
        self._held = pending[last:]
        return pending[:last]

    def flush(self) -> str:
        """Everything held: the generation has ended, no character can extend it now."""
        held, self._held = self._held, ""
        return held


# Code points that can join the one before or after into one cluster (UAX #29 GB3, GB6-GB9b,
# GB11 through ZWJ and Extend, GB12-13). Text made only of others breaks between every two
# code points: a plain-ASCII vocabulary (LF, not CR) needs no holding back at all.
_JOINS = regex.compile(
    r"[\p{Grapheme_Cluster_Break=Extend}\p{Grapheme_Cluster_Break=ZWJ}"
    r"\p{Grapheme_Cluster_Break=SpacingMark}\p{Grapheme_Cluster_Break=Prepend}"
    r"\p{Grapheme_Cluster_Break=Regional_Indicator}\p{Grapheme_Cluster_Break=CR}"
    r"\p{Grapheme_Cluster_Break=L}\p{Grapheme_Cluster_Break=V}\p{Grapheme_Cluster_Break=T}"
    r"\p{Grapheme_Cluster_Break=LV}\p{Grapheme_Cluster_Break=LVT}]")


def can_join(chars: Iterable[str]) -> bool:
    """Whether text over these code points can hold a cluster of more than one of them (if
    not, every cut between code points is a cluster boundary: nothing needs holding back)."""
    return any(_JOINS.match(c) for c in chars)


def _last_cluster_start(text: str) -> int:
    start = 0
    for match in _CLUSTER.finditer(text):
        start = match.start()
    return start


def cluster_boundaries(text: str) -> list[int]:
    """Offsets (in code points) where the clusters of `text` start, and len(text)."""
    return [m.start() for m in _CLUSTER.finditer(text)] + [len(text)]
