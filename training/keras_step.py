"""A `StepFn` over a Keras inference twin (see training/generate.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from training.generate import States, StepFn


def keras_step_fn(twin: Any) -> StepFn:
    names = [i.name for i in twin.inputs[1:]]

    def step(ids: np.ndarray, states: States) -> tuple[np.ndarray, States]:
        out = twin([ids.astype(np.int32), *states], training=False)
        new = [np.asarray(out[f"{n}_out"], dtype=np.float32) for n in names]
        return np.asarray(out["logits"], dtype=np.float32), new

    return step
