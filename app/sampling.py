"""Next-character sampling: a pure, vectorised function of logits and per-row parameters.

Randomness comes in as one uniform draw per row, taken from that row's own generator,
so a seeded request picks the same characters whatever else shares its batch.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]


def softmax(logits: npt.NDArray[np.floating], axis: int = -1) -> FloatArray:
    z = logits - np.max(logits, axis=axis, keepdims=True)
    e = np.exp(z)
    out: FloatArray = (e / np.sum(e, axis=axis, keepdims=True)).astype(np.float32, copy=False)
    return out


def sample_next(
    logits: FloatArray,
    temperature: FloatArray,
    top_k: npt.NDArray[np.int64],
    top_p: npt.NDArray[np.floating],  # float64 in the engine: 1e-50 must not become 0
    uniforms: npt.NDArray[np.float64],
) -> IdArray:
    """Pick one id per row.

    logits (B, V); temperature, top_k, top_p, uniforms (B,).
    temperature 0 is greedy argmax; otherwise ids are drawn from softmax(logits / T),
    which equals the reference notebooks' softmax(log(p) / T). top_k = 0 and top_p = 1
    switch those filters off. uniforms are in [0, 1).
    This runs once per decode step on the hot path: each numpy call costs ~1-2 us at
    small batches, so work that no row needs (greedy, filters) is skipped.
    """
    if logits.shape[0] == 1 and temperature[0] > 0 and top_k[0] == 0 and top_p[0] >= 1.0:
        return _sample_one(logits[0], float(temperature[0]), float(uniforms[0]))
    sampled_rows = temperature > 0
    any_greedy = not bool(np.all(sampled_rows))
    greedy = np.argmax(logits, axis=-1) if any_greedy else None
    if greedy is not None and not np.any(sampled_rows):
        only_greedy: IdArray = greedy.astype(np.int64)
        return only_greedy

    # float64: with T near 0, logits / T spans thousands and float32 exp loses the tail.
    t = np.where(sampled_rows, temperature, 1.0)[:, None] if any_greedy else temperature[:, None]
    scaled = np.asarray(logits, dtype=np.float64) / t
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)  # (B, V), unnormalised

    vocab = logits.shape[-1]
    k = np.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    if np.any(k < vocab) or np.any(top_p < 1.0):
        order = np.argsort(-probs, axis=-1, kind="stable")  # (B, V), most likely first
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        sorted_p /= sorted_p.sum(axis=-1, keepdims=True)
        mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p
        rank = np.arange(vocab)[None, :]
        # Keep the first k, and the smallest prefix whose mass reaches top_p. The likeliest id
        # is always kept: a top_p below float32's range (1e-50) arrives here as 0, and
        # mass_before < 0 would keep nothing. top_p >= 1 keeps everything: mass_before can
        # round up to 1.0 in a long tail.
        keep_sorted = (rank < k[:, None]) & ((rank == 0) | (mass_before < top_p[:, None])
                                             | (top_p[:, None] >= 1.0))
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)

    cdf = np.cumsum(probs, axis=-1)  # (B, V)
    target = np.asarray(uniforms, dtype=np.float64)[:, None] * cdf[:, -1:]
    drawn = (cdf <= target).sum(axis=-1)
    # A zero-probability id can never satisfy cdf > target except when u * total rounds up to
    # total; that lands past the end, where the likeliest id is the safe answer.
    drawn = np.where(drawn < vocab, drawn, np.argmax(probs, axis=-1))
    ids: IdArray = (np.where(sampled_rows, drawn, greedy) if greedy is not None
                    else drawn).astype(np.int64)
    return ids


def _sample_one(row: FloatArray, temperature: float, uniform: float) -> IdArray:
    """One unfiltered row, a single stream's every step: the same arithmetic as the batched
    path (same float64 division, exp and cumsum, so the same id), with a third of the numpy
    calls, whose fixed cost dominates at batch 1."""
    scaled = row.astype(np.float64) / temperature
    scaled -= scaled.max()
    cdf = np.cumsum(np.exp(scaled))
    # count of cdf <= target, as the batched path's (cdf <= target).sum()
    drawn = int(np.searchsorted(cdf, uniform * cdf[-1], side="right"))
    if drawn >= row.shape[0]:
        drawn = int(np.argmax(row))
    return np.array([drawn], np.int64)
