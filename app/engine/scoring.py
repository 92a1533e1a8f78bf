"""Scoring text: the log-probability the model gives each character of a seed, from the
logits prefill computes anyway.

This is the one scoring computation of the service: `/v1/completions` with `echo`, `/score`
and lm-evaluation-harness (through `/v1`) all read the engine's `Scored` event, which prefill
fills with this function slice by slice (app/engine/core.py).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from app.engine.messages import TopLogprobs


def log_softmax(logits: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """log softmax over the last axis, in float64: a character's log-probability is a
    difference of two numbers near the logits' scale, and summing thousands of them in
    float32 would lose the 1e-4 nats a comparison between two scorers can tell apart."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    out: npt.NDArray[np.float64] = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return out


def score_positions(logits: npt.NDArray[np.float32], ids: npt.NDArray[np.integer], top: int
                    ) -> tuple[list[float], list[TopLogprobs] | None]:
    """logits (P, V) predicting ids (P,): [log p(ids[i])] and, with top > 0, the `top`
    likeliest ids at each position with their log-probabilities, likeliest first (ties by
    id). Both come from the same float64 array, so the chosen id's value in `top` equals its
    logprob exactly."""
    lsm = log_softmax(logits)  # (P, V)
    rows = np.arange(len(ids))
    chosen = lsm[rows, np.asarray(ids, np.intp)].tolist()
    if top <= 0:
        return chosen, None
    order = np.argsort(-lsm, axis=-1, kind="stable")[:, :top]  # (P, top)
    values = np.take_along_axis(lsm, order, axis=-1)
    return chosen, [list(zip(o, v, strict=True)) for o, v in zip(order.tolist(), values.tolist(),
                                                                    strict=True)]
