"""An independent scorer for tests: the step graph run one character at a time with numpy on
the host (app.runtime `run_numpy`), no engine, no prefill slices, no state cache."""

from __future__ import annotations

import itertools
import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from app.runtime import load_model


@cache
def _model(model_dir: Path) -> Any:
    return load_model(model_dir)


@cache
def stepwise(model_dir: Path, text: str) -> tuple[float, ...]:
    """log p(text[t] | text[:t]) in nats for t >= 1, from a zero state."""
    model = _model(model_dir)
    ids = model.vocab.encode(text).tolist()
    states = [np.zeros((1, s.size), np.float32) for s in model.meta.onnx.states]
    out = []
    for prev, nxt in itertools.pairwise(ids):
        logits, states = model.run_numpy(np.array([[prev]], np.int32), states)
        z = logits[0, -1].astype(np.float64)
        out.append(float(z[nxt] - z.max() - math.log(np.exp(z - z.max()).sum())))
    return tuple(out)
