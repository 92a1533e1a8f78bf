"""Character ids -> (input, target) windows -> tf.data pipelines.

char-rnn style: each window of T+1 ids gives inputs ids[0:T] and targets ids[1:T+1],
windows advance by T, so every character of the split is a target once per epoch.
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


def dataset(win: IdArray, batch_size: int, shuffle: bool, seed: int) -> Any:
    """A tf.data pipeline of (x, y) batches, (B, T) each; reshuffled every epoch."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(win)
    if shuffle:
        ds = ds.shuffle(len(win), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=False)
    ds = ds.map(lambda w: (w[:, :-1], w[:, 1:]), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
