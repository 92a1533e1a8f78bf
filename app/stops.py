"""Stop sequences with hold-back: a stop string is never emitted, not even in part.

Works on any hashable tokens (the engine feeds character ids). After each token, the
longest pending suffix that could still grow into a stop sequence is held back (at most
max(len(stop)) - 1 tokens); everything before it is safe to emit.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class StopMatcher(Generic[T]):
    def __init__(self, stops: Sequence[Sequence[T]], min_tokens: int = 0) -> None:
        """`min_tokens`: a stop sequence completing before that many tokens have been pushed
        does not stop (vLLM's min_tokens; the held-back tokens are emitted as usual)."""
        self.min_tokens = min_tokens
        self.pushed = 0
        # Longest first, so when two stops end together the earlier-starting one wins.
        self.stops = sorted({tuple(s) for s in stops if len(s) > 0}, key=len, reverse=True)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending: list[T] = []

    def push(self, token: T) -> tuple[list[T], bool]:
        """Add a token; return (tokens now safe to emit, whether a stop sequence completed)."""
        if not self.stops:
            return [token], False
        self.pushed += 1
        pending = self.pending
        pending.append(token)
        for stop in self.stops if self.pushed >= self.min_tokens else ():
            n = len(stop)
            if len(pending) >= n and tuple(pending[-n:]) == stop:
                out = pending[:-n]
                self.pending = []
                return out, True
        keep = self._held_suffix()
        cut = len(pending) - keep
        out = pending[:cut]
        self.pending = pending[cut:]
        return out, False

    def flush(self) -> list[T]:
        """Release whatever is held back (generation ended for another reason)."""
        out, self.pending = self.pending, []
        return out

    def _held_suffix(self) -> int:
        pending = self.pending
        for k in range(min(self.hold, len(pending)), 0, -1):
            tail = tuple(pending[-k:])
            if any(stop[:k] == tail for stop in self.stops):
                return k
        return 0
