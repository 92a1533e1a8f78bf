"""Character ids -> (input, target) windows -> tf.data pipelines.

char-rnn style: each window of T+1 ids gives inputs ids[0:T] and targets ids[1:T+1],
windows advance by T, so every character of the split is a target once per epoch.
Two layouts of those windows: independent windows, shuffled every epoch (`windows`), or B
parallel streams read in order for stateful training (`stream_windows`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

IdArray = npt.NDArray[np.int32]


def split(ids: IdArray, val_fraction: float) -> tuple[IdArray, IdArray]:
    """Train on the first (1 - f) of the text, validate on the last f (the published split)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


def windows(ids: IdArray, seq_len: int) -> IdArray:
    """(N, T+1) windows advancing by T; a short tail that cannot fill a window is dropped."""
    if seq_len < 1:
        raise ValueError(f"sequence length must be >= 1, got {seq_len}")
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(
            f"text of {len(ids)} characters is too short for one window of {seq_len + 1}"
        )
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return np.ascontiguousarray(ids[idx], dtype=np.int32)


def stream_windows(ids: IdArray, seq_len: int, streams: int) -> IdArray:
    """(W * B, T+1) windows of B parallel streams in batch order, for truncated BPTT.

    Stream j reads the text from offset j * L on (L = (len - 1) // B characters each) in W
    windows of T targets; batch i (rows i*B .. i*B + B-1) holds window i of every stream, so
    row j of batch i+1 continues row j of batch i and a state carried along row j has read
    exactly the text before it. Batched in order, never shuffled; a tail of each stream too
    short for a window is dropped (under T * B characters in all).
    """
    if seq_len < 1 or streams < 1:
        raise ValueError(f"need seq_len >= 1 and streams >= 1, got {seq_len} and {streams}")
    per_stream = (len(ids) - 1) // streams
    n = per_stream // seq_len
    if n < 1:
        raise ValueError(f"text of {len(ids)} characters is too short for {streams} streams of "
                         f"one window of {seq_len + 1}")
    starts = np.arange(n)[:, None] * seq_len + np.arange(streams)[None, :] * per_stream  # (W, B)
    idx = starts.reshape(-1)[:, None] + np.arange(seq_len + 1)[None, :]
    return np.ascontiguousarray(ids[idx], dtype=np.int32)


def dataset(win: IdArray, batch_size: int, shuffle: bool, seed: int) -> Any:
    """A tf.data pipeline of (x, y) batches, (B, T) each; reshuffled every epoch."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(win)
    if shuffle:
        ds = ds.shuffle(len(win), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=False)
    ds = ds.map(lambda w: (w[:, :-1], w[:, 1:]), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
