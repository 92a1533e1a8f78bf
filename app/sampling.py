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
    top_p: FloatArray,
    uniforms: npt.NDArray[np.float64],
) -> IdArray:
    """Pick one id per row.

    logits (B, V); temperature, top_k, top_p, uniforms (B,).
    temperature 0 is greedy argmax; otherwise ids are drawn from softmax(logits / T),
    which equals the reference notebooks' softmax(log(p) / T). top_k = 0 and top_p = 1
    switch those filters off. uniforms are in [0, 1).
    """
    logits = np.asarray(logits, dtype=np.float64)  # (B, V); float64 keeps tiny T stable
    greedy = np.argmax(logits, axis=-1)
    sampled_rows = temperature > 0
    if not np.any(sampled_rows):
        only_greedy: IdArray = greedy.astype(np.int64)
        return only_greedy

    t = np.where(sampled_rows, temperature, 1.0)[:, None]
    scaled = logits / t
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)  # (B, V), unnormalised

    vocab = logits.shape[-1]
    k = np.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    filter_rows = (k < vocab) | (top_p < 1.0)
    if np.any(filter_rows):
        order = np.argsort(-probs, axis=-1, kind="stable")  # (B, V), most likely first
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        cum = np.cumsum(sorted_p, axis=-1) / sorted_p.sum(axis=-1, keepdims=True)
        rank = np.arange(vocab)[None, :]
        # Keep the first k, and the smallest prefix whose mass reaches top_p (always >= 1 id).
        keep_sorted = (rank < k[:, None]) & ((cum - sorted_p / sorted_p.sum(-1, keepdims=True))
                                             < top_p[:, None])
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)

    cdf = np.cumsum(probs, axis=-1)  # (B, V)
    target = np.asarray(uniforms, dtype=np.float64)[:, None] * cdf[:, -1:]
    drawn = np.minimum((cdf <= target).sum(axis=-1), vocab - 1)
    # Never land on a zero-probability id (possible only through rounding at the edges).
    drawn = np.where(probs[np.arange(len(drawn)), drawn] > 0, drawn, np.argmax(probs, axis=-1))
    ids: IdArray = np.where(sampled_rows, drawn, greedy).astype(np.int64)
    return ids
