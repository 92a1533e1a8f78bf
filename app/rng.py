"""Counter-based per-row random numbers: uniform = mix(row key, step counter).

Each request's draws depend only on its own seed and on how many characters it has
sampled, never on its batch neighbours, so a seeded request is reproducible under any
load. splitmix64 finalisation, vectorised over the batch in uint64 numpy arithmetic.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: U64) -> U64:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def row_keys(seeds: npt.ArrayLike) -> U64:
    """Scramble user seeds once so nearby seeds give unrelated streams."""
    with np.errstate(over="ignore"):
        return _mix(np.asarray(seeds, dtype=np.uint64) + _GOLDEN)


_MASK = (1 << 64) - 1


def _mix_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def row_uniforms(key: int, counter: int, steps: int) -> list[float]:
    """Draws number counter .. counter + steps - 1 of one stream, as `uniforms` gives them
    (same bits), in Python ints: a single row's K-step block without numpy calls."""
    out = []
    for j in range(steps):
        bits = _mix_int((key + (counter + j + 1) * 0x9E3779B97F4A7C15) & _MASK)
        out.append((bits >> 11) * (1.0 / (1 << 53)))
    return out


def uniforms(keys: U64, counters: U64) -> npt.NDArray[np.float64]:
    """One float in [0, 1) per row for draw number `counters` of stream `keys`."""
    if keys.shape[0] == 1:  # a single stream: Python ints beat ten numpy calls, same bits
        return np.array(row_uniforms(int(keys[0]), int(counters[0]), 1), np.float64)
    with np.errstate(over="ignore"):
        z = _mix(keys + (counters + np.uint64(1)) * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
