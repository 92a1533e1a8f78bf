"""Stateful character generation over any step function (Keras twin or onnxruntime).

The seed primes the state in one call (prefill); then one step per character with the
state carried, as char-rnn samples. Used for per-epoch samples, export parity and `sample`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from app.sampling import sample_next
from app.vocab import Vocabulary

States = list[npt.NDArray[np.float32]]
# (ids (B, T) int32, states [(B, U)...]) -> (logits (B, T, V), new states)
StepFn = Callable[[npt.NDArray[np.int32], States], tuple[npt.NDArray[np.float32], States]]


def zero_states(batch: int, n_states: int, units: int) -> States:
    return [np.zeros((batch, units), np.float32) for _ in range(n_states)]


def generate(
    step: StepFn,
    vocab: Vocabulary,
    seed_text: str,
    temperatures: Sequence[float],
    length: int,
    n_states: int,
    units: int,
    rng: np.random.Generator,
) -> list[str]:
    """One continuation of `seed_text` per temperature, all rows decoded together."""
    rows = len(temperatures)
    seed_ids = vocab.encode(seed_text)
    if len(seed_ids) == 0:
        raise ValueError("seed text must not be empty")
    ids = np.repeat(seed_ids[None, :], rows, axis=0)  # (B, T)
    logits, states = step(ids, zero_states(rows, n_states, units))
    temp = np.asarray(temperatures, np.float32)
    no_k = np.zeros(rows, np.int64)
    no_p = np.ones(rows, np.float32)
    out: list[list[int]] = [[] for _ in range(rows)]
    for _ in range(length):
        nxt = sample_next(logits[:, -1, :], temp, no_k, no_p, rng.random(rows))
        for r in range(rows):
            out[r].append(int(nxt[r]))
        logits, states = step(nxt.astype(np.int32)[:, None], states)
    return [vocab.decode(o) for o in out]
