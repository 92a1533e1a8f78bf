"""Text from a corpus or a model, shown on a terminal: what it holds, never what it does.

Samples and vocabularies can hold any character. Written raw, ESC starts a terminal control
sequence, BEL rings, a lone CR overwrites the line, NUL and the C1 controls vanish, and bidi
overrides reorder what follows. `for_terminal` escapes those as Python's repr does (`\\x1b`,
`\\r`, `\\u202e`) and keeps the rest, LF and TAB included, so text still reads as text.
The files written (samples.txt, samples.md) keep the text as it is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# C0 controls but TAB and LF, DEL, C1 controls; line and paragraph separators; bidi marks,
# embeddings, overrides and isolates.
_HIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f"
                     "\u202a-\u202e\u2066-\u2069]")


def for_terminal(text: str) -> str:
    return _HIDDEN.sub(lambda m: repr(m.group())[1:-1], text)


def name_chars(chars: Sequence[str], limit: int = 10) -> str:
    """`U+0416 'ж', U+001B '\\x1b', ... and 12 more`: characters a reader can find again."""
    shown = ", ".join(f"U+{ord(c):04X} '{for_terminal(c)}'" for c in chars[:limit])
    return shown + (f" and {len(chars) - limit:,} more" if len(chars) > limit else "")
