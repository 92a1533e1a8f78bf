"""Exact state cache: the recurrent state after a seed prefix, so a seed whose prefix was run
recently skips that prefix's prefill.

An LSTM's whole memory of a text is its state (4 KB for 2 x 256 units, (h, c) each), so a
prefix costs a few kilobytes to keep, whatever its length. States are kept at every
BOUNDARY characters and at the end of each seed, keyed by a 128-bit BLAKE2b digest of the
prefix's ids (the exact text; a collision is as likely as a SHA-256 one at this size), in
LRU order within a byte budget. Using a cached state changes nothing in the output: a step
over a prefix and then the rest equals one call over the whole.

The graph returns only the state at the end of a call, so states can be kept where prefill
slices end: every `every` characters (the engine's prefill slice, 256 by default) and at the
end of each seed. Smaller slices would give finer boundaries for more graph calls.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

ENTRY_OVERHEAD = 200  # bytes of Python objects around each entry's arrays (measured order)


@dataclass
class Entry:
    states: Any  # the model's state batch for one row
    logits: npt.NDArray[np.float32]  # (V,): next-id logits after the prefix
    nbytes: int


def prefix_digests(ids: npt.NDArray[np.int32], every: int, scope: bytes = b""
                   ) -> dict[int, bytes]:
    """{prefix length: digest} for every multiple of `every` below len(ids), and len(ids).
    `scope` (up to 64 bytes) keys the hash: each scope has its own entries."""
    h = hashlib.blake2b(digest_size=16, key=scope[:64])
    raw = np.ascontiguousarray(ids, dtype=np.int32).tobytes()
    out: dict[int, bytes] = {}
    start = 0
    for end in [*range(every, len(ids), every), len(ids)]:
        h.update(raw[start * 4:end * 4])
        out[end] = h.copy().digest()
        start = end
    return out


def state_bytes(states: Any) -> int:
    if isinstance(states, np.ndarray):
        return int(states.nbytes)
    total = 0
    for t in getattr(states, "tensors", []):
        if isinstance(t, np.ndarray):
            total += int(t.nbytes)
        else:  # a device OrtValue: float32 of its shape
            total += 4 * int(np.prod(t.shape()))
    return total


class StateCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.chars_saved = 0

    def lookup(self, digests: dict[int, bytes]) -> tuple[int, Entry | None]:
        """The longest cached prefix: (its length, its entry), or (0, None)."""
        for length in sorted(digests, reverse=True):
            entry = self.entries.get(digests[length])
            if entry is not None:
                self.entries.move_to_end(digests[length])
                self.hits += 1
                self.chars_saved += length
                return length, entry
        self.misses += 1
        return 0, None

    def store(self, digest: bytes, states: Any, logits: npt.NDArray[np.float32]) -> None:
        if digest in self.entries:
            self.entries.move_to_end(digest)
            return
        nbytes = state_bytes(states) + int(logits.nbytes) + ENTRY_OVERHEAD
        if nbytes > self.max_bytes:
            return
        self.entries[digest] = Entry(states, logits, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
