"""`evaluate` and `sample`: exported ONNX models scored and sampled with onnxruntime."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.runtime import OnnxModel, RuntimeOptions, load_model
from training import corpus as corpus_mod
from training import data
from training.generate import generate


@dataclass(frozen=True)
class Score:
    loss_nats: float
    characters: int
    window: int

    @property
    def bits_per_char(self) -> float:
        return self.loss_nats / math.log(2)


def nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed next-character cross-entropy (nats) of logits (..., V) for int targets (...)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    picked = np.take_along_axis(z, np.asarray(targets, np.int64)[..., None], axis=-1)[..., 0]
    return float((log_norm - picked).sum())


def cross_entropy(model: OnnxModel, ids: np.ndarray, window: int, batch: int = 128) -> Score:
    """Mean next-character cross-entropy over windows of `window` targets from a zero state.

    This is how Keras measured val_loss during training, so the two agree.
    """
    win = data.windows(ids.astype(np.int32), window)
    total, count = 0.0, 0
    for start in range(0, len(win), batch):
        chunk = win[start : start + batch]
        zeros = [np.zeros((len(chunk), n), np.float32) for n in model.state_sizes]
        logits, _ = model.run_numpy(chunk[:, :-1], zeros)  # (B, T, V)
        total += nll_sum(logits, chunk[:, 1:])
        count += int(chunk[:, 1:].size)
    return Score(total / count, count, window)


def validation_ids(model: OnnxModel, texts: list[Path], val_fraction: float) -> np.ndarray:
    meta = model.meta
    if texts:
        sources = [str(p) for p in texts]
    else:
        sources = corpus_mod.sources_for(meta.corpus.name, meta.corpus.files)
    corpus = corpus_mod.load(sources, lowercase=meta.lowercase)
    ids = model.vocab.encode(corpus.text)
    if val_fraction >= 1:
        return ids
    return data.split(ids, val_fraction)[1]


def evaluate_cli(model_dir: Path, texts: list[Path], val_fraction: float,
                 window: int | None) -> Score:
    model = load_model(model_dir, RuntimeOptions(device="cpu", intra_op_threads=0))
    ids = validation_ids(model, texts, val_fraction)
    win = window or int(model.meta.training.get("seq_len", 100))  # type: ignore[call-overload]
    score = cross_entropy(model, ids, win)
    what = "all" if val_fraction >= 1 else f"the last {val_fraction:.0%}"
    print(f"model {model.name}: {score.loss_nats:.4f} nats/char, {score.bits_per_char:.4f} "
          f"bits/char over {score.characters:,} characters ({what} of the text, "
          f"windows of {score.window})")
    return score


def sample_cli(model_dir: Path, seed_text: str, temperatures: list[float], length: int,
               seed: int | None) -> list[str]:
    model = load_model(model_dir, RuntimeOptions(device="cpu"))
    if model.meta.lowercase:
        seed_text = seed_text.lower()
    texts = generate(model.run_numpy, model.vocab, seed_text, temperatures, length,
                     len(model.state_in), model.state_sizes[0], np.random.default_rng(seed))
    for t, text in zip(temperatures, texts, strict=True):
        print(f"--- temperature {t}\n{seed_text}{text}\n")
    return texts
