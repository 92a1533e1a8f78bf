"""`evaluate` and `sample`: exported ONNX models scored and sampled with onnxruntime.

Validation loss is measured three ways, because the figure depends on how much context each
prediction gets:

- `training_windows`: windows of the training length from a zero state, as Keras measured
  val_loss during training (targets see 1..T characters of context);
- `windows_256`: windows of 256 from a zero state, like for like with nanoGPT's evaluation of its
  character model (block size 256);
- `carried_state`: one pass over the whole validation text with the state carried, as the
  service runs (it never resets the state mid-text).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.artifact import (
    METADATA_FILE,
    LossMeasure,
    ModelMetadata,
    ValidationInfo,
    write_metadata,
)
from app.runtime import OnnxModel, RuntimeOptions, load_model
from app.vocab import normalize
from training import corpus as corpus_mod
from training import data
from training.display import for_terminal
from training.generate import StepFn, generate

NANOGPT_BLOCK = 256
CARRIED_CHUNK = 4096  # characters per onnxruntime call in the carried pass; bounds memory only


class EvaluateError(ValueError):
    """A measurement that cannot be made or recorded as asked."""


@dataclass(frozen=True)
class Score:
    loss_nats: float
    characters: int  # targets scored
    window: int  # characters per zero-state window; all of them for the carried pass

    @property
    def bits_per_char(self) -> float:
        return self.loss_nats / math.log(2)


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    score: Score


def nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed next-character cross-entropy (nats) of logits (..., V) for int targets (...)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    picked = np.take_along_axis(z, np.asarray(targets, np.int64)[..., None], axis=-1)[..., 0]
    return float((log_norm - picked).sum())


def window_loss(step: StepFn, state_sizes: Sequence[int], ids: np.ndarray, window: int,
                batch: int = 128) -> Score:
    """Mean next-character cross-entropy over windows of `window` targets, each from a zero
    state; windows advance by `window`, a tail too short for one is dropped."""
    win = data.windows(ids.astype(np.int32), window)
    total, count = 0.0, 0
    for start in range(0, len(win), batch):
        chunk = win[start : start + batch]
        zeros = [np.zeros((len(chunk), n), np.float32) for n in state_sizes]
        logits, _ = step(chunk[:, :-1], zeros)  # (B, T, V)
        total += nll_sum(logits, chunk[:, 1:])
        count += int(chunk[:, 1:].size)
    return Score(total / count, count, window)


def carried_loss(step: StepFn, state_sizes: Sequence[int], ids: np.ndarray,
                 chunk: int = CARRIED_CHUNK) -> Score:
    """Mean next-character cross-entropy of one pass over `ids` from a zero state at the first
    character, the state carried to the end (every target but the first sees all the text
    before it). Chunking only bounds memory: the state crosses chunk boundaries."""
    ids = ids.astype(np.int32)
    if len(ids) < 2:
        raise EvaluateError(f"text of {len(ids)} characters has nothing to predict")
    states = [np.zeros((1, n), np.float32) for n in state_sizes]
    total = 0.0
    for start in range(0, len(ids) - 1, chunk):
        x = ids[start : start + chunk]
        y = ids[start + 1 : start + chunk + 1]
        x = x[: len(y)]  # the last chunk has no target after the final character
        logits, states = step(x[None, :], states)  # (1, T, V)
        total += nll_sum(logits, y[None, :])
    targets = len(ids) - 1
    return Score(total / targets, targets, targets)


def measure_all(step: StepFn, state_sizes: Sequence[int], ids: np.ndarray,
                train_window: int) -> list[Measure]:
    """The three labelled measures of the module docstring, in that order."""
    return [
        Measure("training_windows",
                f"windows of {train_window} from a zero state (training's val_loss)",
                window_loss(step, state_sizes, ids, train_window)),
        Measure("windows_256",
                f"windows of {NANOGPT_BLOCK} from a zero state (nanoGPT's block size)",
                window_loss(step, state_sizes, ids, NANOGPT_BLOCK)),
        Measure("carried_state",
                "one pass over the whole text, state carried (as the service runs)",
                carried_loss(step, state_sizes, ids)),
    ]


def cross_entropy(model: OnnxModel, ids: np.ndarray, window: int, batch: int = 128) -> Score:
    """`window_loss` of an exported model: how Keras measured val_loss during training."""
    return window_loss(model.run_numpy, model.state_sizes, ids, window, batch)


def validation_info(measures: list[Measure], fraction: float) -> ValidationInfo:
    """model.json's `validation`: the training-window figure on top (as before), all three
    under `measures`."""
    first = measures[0].score

    def rounded(m: Measure) -> LossMeasure:
        return LossMeasure(label=m.label, window=m.score.window, characters=m.score.characters,
                           loss_nats=round(m.score.loss_nats, 4),
                           bits_per_char=round(m.score.bits_per_char, 4))

    return ValidationInfo(fraction=fraction, characters=first.characters, window=first.window,
                          loss_nats=round(first.loss_nats, 4),
                          bits_per_char=round(first.bits_per_char, 4),
                          measures={m.key: rounded(m) for m in measures})


def model_val_fraction(meta: ModelMetadata) -> float:
    if meta.validation is not None:
        return meta.validation.fraction
    return float(str(meta.training.get("val_fraction", 0.1)))


def model_train_window(meta: ModelMetadata) -> int:
    return int(str(meta.training.get("seq_len", 100)))


def load_text(meta: ModelMetadata, texts: list[Path]) -> corpus_mod.Corpus:
    if texts:
        sources = [str(p) for p in texts]
    else:
        sources = corpus_mod.sources_for(meta.corpus.name, meta.corpus.files)
    return corpus_mod.load(sources, lowercase=meta.lowercase, normalization=meta.normalization)


def validation_ids(model: OnnxModel, corpus: corpus_mod.Corpus, val_fraction: float
                   ) -> np.ndarray:
    ids = model.vocab.encode(corpus.text)
    if val_fraction >= 1:
        return ids
    return data.split(ids, val_fraction)[1]


def record_validation(model: OnnxModel, measures: list[Measure], fraction: float) -> Path:
    """Write the measures into the model's model.json, keeping every other field."""
    meta = model.meta.model_copy(update={"validation": validation_info(measures, fraction)})
    return write_metadata(model.dir, meta)  # atomic: one rename


def print_measures(name: str, measures: list[Measure], fraction: float) -> None:
    what = "all" if fraction >= 1 else f"the last {fraction:.0%}"
    chars = measures[-1].score.characters + 1
    print(f"model {name}: validation loss on {what} of the text ({chars:,} characters)")
    for m in measures:
        s = m.score
        print(f"  {m.key:<17} {s.loss_nats:.4f} nats/char  {s.bits_per_char:.4f} bits/char  "
              f"{m.label}, {s.characters:,} targets")


def evaluate_cli(model_dir: Path, texts: list[Path], val_fraction: float | None,
                 window: int | None, update: bool = False) -> list[Measure]:
    """Print the three measures; with `update`, also record them in model_dir/model.json."""
    model = load_model(model_dir, RuntimeOptions(device="cpu", intra_op_threads=0))
    meta = model.meta
    fraction = model_val_fraction(meta) if val_fraction is None else val_fraction
    train_window = model_train_window(meta)
    corpus = load_text(meta, texts)
    if update:
        # model.json must describe the model's own split, not some other text or measure.
        if corpus.sha256 != meta.corpus.sha256:
            raise EvaluateError(
                f"refusing to update {model_dir / METADATA_FILE}: the text has sha256 "
                f"{corpus.sha256[:16]}..., the model was trained on {meta.corpus.sha256[:16]}... "
                "(pass the corpus the model was trained on)")
        if fraction != model_val_fraction(meta) or window not in (None, train_window):
            raise EvaluateError("--update records the model's own measures: leave --val-fraction "
                                "and --window at their defaults")
    ids = validation_ids(model, corpus, fraction)
    measures = measure_all(model.run_numpy, model.state_sizes, ids, window or train_window)
    print_measures(model.name, measures, fraction)
    if update:
        print(f"updated {record_validation(model, measures, fraction)}")
    return measures


def sample_cli(model_dir: Path, seed_text: str, temperatures: list[float], length: int,
               seed: int | None) -> list[str]:
    model = load_model(model_dir, RuntimeOptions(device="cpu"))
    if model.meta.lowercase:
        seed_text = seed_text.lower()
    seed_text = normalize(seed_text, model.meta.normalization)
    texts = generate(model.run_numpy, model.vocab, seed_text, temperatures, length,
                     len(model.state_in), model.state_sizes[0], np.random.default_rng(seed))
    for t, text in zip(temperatures, texts, strict=True):
        print(f"--- temperature {t}\n{for_terminal(seed_text + text)}\n")
    return texts

