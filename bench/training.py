"""`python -m bench.training`: training throughput per configuration (issue 21), and, with
`--schemes`, our char-rnn training scheme against the Keras example's (issue 3).

The configuration sweep (the default): models/shakespeare's architecture (Embedding(64) -> 2 x
LSTM(256), dropout 0.2 -> Dense) trained as `python -m training train` trains it, under each
configuration of the settings that change speed but not the model: Keras backend, threads,
batch size, window length, jit_compile, bf16 mixed precision, a fixed window length and the
input pipeline. Each configuration runs in a process of its own (backend and threads are chosen
before import), in rounds: every round runs every configuration once, in a rotated order, so
that the machine's other load falls on all of them alike; medians over the rounds are reported,
with the spread. Phase 1 measures target characters per second over a short window after the
first steps (graph tracing and compilation excluded). Phase 2 trains today's default and the
fastest configuration for the same wall time from the start (compilation included), in
alternation, and scores both on the whole validation split (windows of 100 from a zero state,
training's val_loss). Then the fastest is profiled with py-spy. Writes
bench/results/training-sweep-<host>-<YYYYMMDD>.json and .md.

The scheme comparison (`--schemes`): both schemes train on the first 90% of the corpus for the
same wall-clock budget, in one process, one after the other; then each is scored on the last
10% (issue 3).

- ours (training/): ids (B, 100) -> Embedding(64) -> N x LSTM -> Dense logits, a target at
  every position, windows advancing by 100 (each training character a target once per
  epoch), tf.data, Adam(2e-3, clipnorm 5), batch 64. Run as shipped (2 x LSTM(256)) and at
  the notebook's size (1 x LSTM(128)), so that one comparison is like for like.
- notebook (the Keras char-LSTM example): one-hot windows (N, 60, V) taken every 3 characters,
  LSTM(128) -> Dense(V, softmax), one target per window (the next character), RMSprop(0.01),
  batch 128, `fit` on numpy arrays.

Throughput is counted in target characters per second (next-character predictions trained)
and in input characters per second (characters fed to the LSTM), over the steps after a short
warm-up (graph tracing), and over the whole budget. Validation loss is next-character
cross-entropy in nats and bits per character: for ours over windows of 100 from a zero state,
as training and `training evaluate` measure it; for the notebook the character after each
60-character window of the validation text. All models are also scored on the notebook's
targets (60 characters of context each), so the losses can be compared on the same footing.

Writes bench/results/training-<host>-<YYYYMMDD>.json and .md (`-quick` added with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app.vocab import Vocabulary
from bench.common import result_stem, write_json
from training import corpus as corpus_mod
from training import data
from training.environment import quiet_tensorflow
from training.evaluate import nll_sum
from training.model import ModelConfig, build_training_model, count_parameters

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = (
    Path(os.environ.get("CHARLSTM_DATA", ROOT.parent / "shared" / "data")) / "tinyshakespeare.txt"
)
VAL_FRACTION = 0.1  # as training/train.py
DEFAULT_BUDGET_S = 150.0
QUICK_BUDGET_S = 2.0
QUICK_CHARS = 30_000
QUICK_VAL_STRIDE = 5
# Scoring the char after every 60-char window costs 60 LSTM steps per target (the shipped
# model takes minutes for all 111k on 2 loaded cores); every 3rd is ~37k targets.
DEFAULT_VAL_STRIDE = 3
WARMUP_STEPS = 5  # excluded from the steady throughput: the first holds the graph tracing
EVAL_BATCH = 512

# Ours: training/train.py defaults.
SEQ_LEN, BATCH, LEARNING_RATE, CLIPNORM = 100, 64, 2e-3, 5.0
# The Keras example.
NB_MAXLEN, NB_STEP, NB_UNITS, NB_LEARNING_RATE, NB_BATCH = 60, 3, 128, 0.01, 128

IdArray = npt.NDArray[np.int32]
Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Split:
    train: IdArray
    val: IdArray
    vocab_size: int


@dataclass(frozen=True)
class Score:
    loss_nats: float
    targets: int
    method: str

    @property
    def bits_per_char(self) -> float:
        return self.loss_nats / math.log(2)


@dataclass
class SchemeResult:
    name: str
    description: str
    params: int
    batch_size: int
    window: int  # input characters per training window
    targets_per_window: int
    train_windows: int  # per epoch
    setup_s: float  # building arrays and the model, not counted in the budget
    train_time_s: float
    steps: int
    windows_trained: int
    epochs: float
    target_chars_per_s: float  # after warm-up
    input_chars_per_s: float
    target_chars_per_s_overall: float  # whole budget, tracing included
    input_chars_per_s_overall: float
    first_step_s: float  # graph tracing and the first batch
    median_step_s: float  # after warm-up: robust to stalls from other jobs on the machine
    train_loss_last_epoch: float  # running mean over the last (partial) epoch, nats/char
    val_nats: float
    val_bits: float
    val_targets: int
    val_method: str
    ctx60_nats: float  # on the notebook's targets: the char after each 60-char window
    ctx60_bits: float
    ctx60_targets: int
    eval_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


class _Clock:
    """What the budget callback saw: when each step ended, seconds since fit began."""

    def __init__(self) -> None:
        self.step_ends: list[float] = []


def budget_callback(budget_s: float, clock: _Clock) -> Any:
    """A Keras callback that stops `fit` once `budget_s` seconds of training have passed.

    fit runs with no validation data and no other callbacks, so the clock covers graph
    tracing, the input pipeline and the train steps, and nothing else.
    """
    import keras

    class TrainingBudget(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            elapsed = time.perf_counter() - self.t0
            clock.step_ends.append(elapsed)
            if elapsed >= budget_s:
                self.model.stop_training = True

    return TrainingBudget()


def windows_after(steps: int, n_windows: int, batch_size: int) -> int:
    """Windows trained after `steps` batches of an epoch-wise pass with a partial last batch."""
    per_epoch = math.ceil(n_windows / batch_size)
    full, rest = divmod(steps, per_epoch)
    return full * n_windows + min(rest * batch_size, n_windows)


def load_split(corpus: str, max_chars: int | None) -> tuple[Split, dict[str, Any]]:
    """The text as training reads it: vocabulary of the whole text, last 10% for validation."""
    c = corpus_mod.load([corpus])
    text = c.text[:max_chars] if max_chars else c.text
    vocab = Vocabulary.from_text([text])
    train_ids, val_ids = data.split(vocab.encode(text).astype(np.int32), VAL_FRACTION)
    facts = {"name": c.name, "files": c.files, "sha256": c.sha256, "characters": len(text),
             "train_characters": len(train_ids), "val_characters": len(val_ids),
             "vocab_size": len(vocab)}
    return Split(train_ids, val_ids, len(vocab)), facts


def context_starts(n_ids: int, context: int, stride: int) -> npt.NDArray[np.int64]:
    """Starts i of the windows ids[i : i + context] whose next character ids[i + context] is
    a target: every `stride`-th position of the text (1 = all)."""
    return np.arange(0, n_ids - context, stride, dtype=np.int64)


def one_hot(ids: npt.NDArray[Any], vocab_size: int) -> npt.NDArray[np.bool_]:
    """(..., ) ids -> (..., V) booleans, as the Keras example builds its arrays."""
    out = np.zeros((*ids.shape, vocab_size), dtype=np.bool_)
    np.put_along_axis(out, np.asarray(ids, np.int64)[..., None], True, axis=-1)
    return out


def score_after_context(last_logits: Callable[[IdArray], Floats], ids: IdArray, context: int,
                        stride: int) -> Score:
    """Mean cross-entropy of the character after each `context`-char window (every `stride`)."""
    starts = context_starts(len(ids), context, stride)
    total = 0.0
    for chunk in _chunks(starts, EVAL_BATCH):
        win = ids[chunk[:, None] + np.arange(context)[None, :]]  # (B, context)
        total += nll_sum(last_logits(win), ids[chunk + context])
    how = "all positions" if stride == 1 else f"one position in {stride}"
    return Score(total / len(starts), len(starts),
                 f"the character after each {context}-character window, {how}")


def score_zero_state_windows(model: Any, ids: IdArray, seq_len: int) -> Score:
    """As training/evaluate.py: windows of `seq_len` targets from a zero state."""
    win = data.windows(ids, seq_len)
    total, count = 0.0, 0
    for chunk in _chunks(win, EVAL_BATCH // 4):
        total += nll_sum(model.predict_on_batch(chunk[:, :-1]), chunk[:, 1:])  # (B, T, V)
        count += chunk[:, 1:].size
    return Score(total / count, count, f"windows of {seq_len} from a zero state (as evaluate)")


def _chunks(arr: npt.NDArray[Any], size: int) -> Iterator[npt.NDArray[Any]]:
    for start in range(0, len(arr), size):
        yield arr[start : start + size]


def _fit(model: Any, budget_s: float, callbacks: list[Any] | None = None,
         **fit_kwargs: Any) -> tuple[_Clock, float]:
    """fit until the budget is spent; returns the step clock and the last epoch's mean loss."""
    clock = _Clock()
    history = model.fit(epochs=1_000_000, verbose=0,
                        callbacks=[*(callbacks or []), budget_callback(budget_s, clock)],
                        **fit_kwargs)
    return clock, float(history.history["loss"][-1])


def _result(name: str, description: str, model: Any, *, batch_size: int, window: int,
            targets_per_window: int, train_windows: int, setup_s: float, clock: _Clock,
            train_loss: float, val: Score, ctx60: Score, eval_s: float,
            load_before: tuple[float, float, float]) -> SchemeResult:
    steps = len(clock.step_ends)
    trained = windows_after(steps, train_windows, batch_size)
    total_s = clock.step_ends[-1]
    # Steady rate: from the end of the warm-up steps to the last step.
    w = min(WARMUP_STEPS, steps - 1)
    steady_windows = trained - windows_after(w, train_windows, batch_size) if w > 0 else trained
    steady_s = total_s - clock.step_ends[w - 1] if w > 0 else total_s
    per_s = steady_windows / steady_s
    return SchemeResult(
        name=name, description=description, params=count_parameters(model),
        batch_size=batch_size, window=window, targets_per_window=targets_per_window,
        train_windows=train_windows, setup_s=setup_s, train_time_s=total_s, steps=steps,
        windows_trained=trained, epochs=trained / train_windows,
        target_chars_per_s=per_s * targets_per_window, input_chars_per_s=per_s * window,
        target_chars_per_s_overall=trained * targets_per_window / total_s,
        input_chars_per_s_overall=trained * window / total_s,
        first_step_s=clock.step_ends[0],
        median_step_s=float(np.median(np.diff(clock.step_ends[w - 1 :]))) if w > 0 else total_s,
        train_loss_last_epoch=train_loss,
        val_nats=val.loss_nats, val_bits=val.bits_per_char, val_targets=val.targets,
        val_method=val.method, ctx60_nats=ctx60.loss_nats, ctx60_bits=ctx60.bits_per_char,
        ctx60_targets=ctx60.targets, eval_s=eval_s, load_before=load_before,
        load_after=os.getloadavg(),
    )


def run_ours(name: str, cfg: ModelConfig, split: Split, budget_s: float, val_stride: int,
             seed: int) -> SchemeResult:
    import keras

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    keras.utils.set_random_seed(seed)
    train_win = data.windows(split.train, SEQ_LEN)  # (N, T + 1)
    train_ds = data.dataset(train_win, BATCH, shuffle=True, seed=seed)
    model = build_training_model(cfg)
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE, clipnorm=CLIPNORM),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    setup_s = time.perf_counter() - t0
    clock, train_loss = _fit(model, budget_s, x=train_ds, shuffle=False)  # ds shuffles

    t0 = time.perf_counter()
    val = score_zero_state_windows(model, split.val, SEQ_LEN)
    ctx60 = score_after_context(lambda w: model.predict_on_batch(w)[:, -1, :], split.val,
                                NB_MAXLEN, val_stride)
    eval_s = time.perf_counter() - t0
    description = (f"Embedding({cfg.embedding_dim}) -> {cfg.layers} x LSTM({cfg.units}), "
                   f"dropout {cfg.dropout} -> Dense logits; windows of {SEQ_LEN} every "
                   f"{SEQ_LEN}, target at every position; Adam({LEARNING_RATE}, clipnorm "
                   f"{CLIPNORM}), batch {BATCH}, tf.data")
    return _result(name, description, model, batch_size=BATCH, window=SEQ_LEN,
                   targets_per_window=SEQ_LEN, train_windows=len(train_win), setup_s=setup_s,
                   clock=clock, train_loss=train_loss, val=val, ctx60=ctx60, eval_s=eval_s,
                   load_before=load_before)


def build_notebook_model(vocab_size: int) -> Any:
    """The Keras example's model, as it writes it."""
    import keras

    model = keras.Sequential([
        keras.Input(shape=(NB_MAXLEN, vocab_size)),
        keras.layers.LSTM(NB_UNITS),
        keras.layers.Dense(vocab_size, activation="softmax"),
    ])
    model.compile(loss="categorical_crossentropy",
                  optimizer=keras.optimizers.RMSprop(learning_rate=NB_LEARNING_RATE))
    return model


def notebook_arrays(ids: IdArray, vocab_size: int
                    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """x (N, 60, V) and y (N, V) one-hot booleans: windows every 3 chars, next char as target."""
    starts = np.arange(0, len(ids) - NB_MAXLEN, NB_STEP)
    x = one_hot(ids[starts[:, None] + np.arange(NB_MAXLEN)[None, :]], vocab_size)
    y = one_hot(ids[starts + NB_MAXLEN], vocab_size)
    return x, y


def notebook_last_logits(model: Any, vocab_size: int) -> Callable[[IdArray], Floats]:
    """Logits of the softmax layer (exact log-probabilities, no clipping) for id windows."""
    import keras

    lstm, dense = model.layers
    features = keras.Model(model.inputs, lstm.output)
    kernel, bias = (np.asarray(w, np.float64) for w in dense.get_weights())

    def last_logits(win: IdArray) -> Floats:
        h = np.asarray(features.predict_on_batch(one_hot(win, vocab_size)), np.float64)
        return h @ kernel + bias  # (B, V)

    return last_logits


def run_notebook(split: Split, budget_s: float, val_stride: int, seed: int) -> SchemeResult:
    import keras

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    keras.utils.set_random_seed(seed)
    x, y = notebook_arrays(split.train, split.vocab_size)
    model = build_notebook_model(split.vocab_size)
    setup_s = time.perf_counter() - t0
    clock, train_loss = _fit(model, budget_s, x=x, y=y, batch_size=NB_BATCH)
    n_windows = len(x)
    del x, y

    t0 = time.perf_counter()
    ctx60 = score_after_context(notebook_last_logits(model, split.vocab_size), split.val,
                                NB_MAXLEN, val_stride)
    eval_s = time.perf_counter() - t0
    description = (f"one-hot windows of {NB_MAXLEN} every {NB_STEP} chars -> LSTM({NB_UNITS}) "
                   f"-> Dense softmax; one target per window; RMSprop({NB_LEARNING_RATE}), "
                   f"batch {NB_BATCH}, fit on numpy arrays")
    return _result("notebook 1x128", description, model, batch_size=NB_BATCH, window=NB_MAXLEN,
                   targets_per_window=1, train_windows=n_windows, setup_s=setup_s, clock=clock,
                   train_loss=train_loss, val=ctx60, ctx60=ctx60, eval_s=eval_s,
                   load_before=load_before)


def machine_facts() -> dict[str, Any]:
    import keras
    import tensorflow as tf

    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "numpy": np.__version__,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
    }


def render_markdown(report: dict[str, Any]) -> str:
    m, c = report["machine"], report["corpus"]
    results = [SchemeResult(**r) for r in report["schemes"]]
    nb = next(r for r in results if r.name.startswith("notebook"))
    ours = next(r for r in results if r is not nb)
    lines = [
        f"# Training throughput and loss per wall time: {m['hostname']}, {report['date']}",
        "",
        f"`python -m bench.training{' --quick' if report['quick'] else ''} --budget-s "
        f"{report['budget_s']:g}`: corpus `{c['name']}` ({c['characters']:,} characters, "
        f"vocabulary {c['vocab_size']}), first 90% trained ({c['train_characters']:,}), last "
        f"10% validated ({c['val_characters']:,}); {report['budget_s']:g} s of training per "
        "scheme, one after the other in one process.",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['processor']}, "
        f"{m['platform']}; Python {m['python']}, TensorFlow {m['tensorflow']}, Keras "
        f"{m['keras']}, numpy {m['numpy']}. Load average (1/5/15 min) "
        f"{_load(report['load_before'])} before, {_load(report['load_after'])} after; per "
        "scheme below (other work on the machine slows every scheme: read the ratios).",
        "",
        "| scheme | params | target chars/s | input chars/s | target chars/s vs notebook "
        "| val loss after budget, nats/char (bits) | vs notebook | val loss on the notebook's "
        "targets (60-char context), nats (bits) | steps | epochs | load before → after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.params:,} | {r.target_chars_per_s:,.0f} | "
            f"{r.input_chars_per_s:,.0f} | {r.target_chars_per_s / nb.target_chars_per_s:.1f}× "
            f"| {r.val_nats:.4f} ({r.val_bits:.3f}) | {r.val_nats - nb.val_nats:+.4f} | "
            f"{r.ctx60_nats:.4f} ({r.ctx60_bits:.3f}) | {r.steps:,} | {r.epochs:.2f} | "
            f"{r.load_before[0]:.2f} → {r.load_after[0]:.2f} |"
        )
    lines += [
        "",
        "| scheme | first step (tracing), s | median step, ms | target chars/s at the median "
        "step | target chars/s over the whole budget | windows trained | scoring, s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.first_step_s:.2f} | {r.median_step_s * 1e3:.1f} | "
            f"{r.batch_size * r.targets_per_window / r.median_step_s:,.0f} | "
            f"{r.target_chars_per_s_overall:,.0f} | {r.windows_trained:,} | {r.eval_s:.1f} |"
        )
    lines += [
        "",
        "- Schemes:",
        *[f"  - **{r.name}**: {r.description}." for r in results],
        f"- Throughput: windows trained × characters per window / seconds, from the end of "
        f"step {WARMUP_STEPS} (the first step holds the graph tracing) to the end of the last "
        "step. Target characters are next-character predictions trained; input characters "
        "are characters fed to the LSTM. Whole-budget rates (tracing included) are in the "
        "JSON.",
        "- Budget: a Keras callback stops `fit` after the first step that ends past the budget; "
        "`fit` runs without validation data, so only training is timed. Building the arrays "
        "and the model is not counted (`setup_s` in the JSON).",
        f"- Validation loss: ours over {ours.val_method}, {ours.val_targets:,} "
        f"targets; the notebook over {nb.val_method}, {nb.val_targets:,} targets, from the "
        "logits under its softmax. The last loss column scores every model on those "
        "notebook targets (each with 60 characters of context; ours see fewer on average in "
        "zero-state windows of 100, where early positions have little).",
    ]
    return "\n".join(lines) + "\n"


def _load(load: list[float] | tuple[float, ...]) -> str:
    return " / ".join(f"{v:.2f}" for v in load)


def run(budget_s: float, corpus: str, quick: bool, out: Path, val_stride: int,
        seed: int) -> tuple[Path, Path]:
    load_before = os.getloadavg()
    split, corpus_facts = load_split(corpus, QUICK_CHARS if quick else None)
    machine = machine_facts()
    small = ModelConfig(vocab_size=split.vocab_size, layers=1, units=128)
    shipped = ModelConfig(vocab_size=split.vocab_size)  # 2 x LSTM(256), embedding 64
    results: list[SchemeResult] = []
    for name, run_one in [
        ("notebook 1x128", lambda: run_notebook(split, budget_s, val_stride, seed)),
        ("ours 1x128", lambda: run_ours("ours 1x128", small, split, budget_s, val_stride, seed)),
        ("ours 2x256", lambda: run_ours("ours 2x256 (shipped)", shipped, split, budget_s,
                                        val_stride, seed)),
    ]:
        print(f"{name}: training for {budget_s:g} s ...", flush=True)
        r = run_one()
        results.append(r)
        print(f"{r.name}: {r.steps} steps, {r.target_chars_per_s:,.0f} target chars/s, "
              f"{r.input_chars_per_s:,.0f} input chars/s, val {r.val_nats:.4f} nats/char "
              f"({r.val_bits:.3f} bits), on the notebook's targets {r.ctx60_nats:.4f}; "
              f"load {_load(r.load_before)} -> {_load(r.load_after)}", flush=True)

    day = date.today()
    report = {
        "benchmark": "training",
        "date": day.isoformat(),
        "command": " ".join(["python -m bench.training", *sys.argv[1:]]),
        "quick": quick,
        "budget_s": budget_s,
        "seed": seed,
        "val_stride": val_stride,
        "warmup_steps": WARMUP_STEPS,
        "corpus": corpus_facts,
        "machine": machine,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "schemes": [asdict(r) for r in results],
    }
    stem = result_stem(out, "training", "-quick" if quick else "")
    # Not with_suffix: a dotted host name would lose its last part.
    json_path, md_path = (stem.parent / f"{stem.name}.{ext}" for ext in ("json", "md"))
    write_json(json_path, report)
    md_path.write_text(render_markdown(json.loads(json_path.read_text())))
    return json_path, md_path


# --- issue 21: the configuration sweep -----------------------------------------------------

SWEEP_WINDOW_S = 5.0  # phase 1: seconds of steady training measured per configuration
SWEEP_WARMUP_STEPS = 2  # phase 1: steps before the window (tracing, compilation)
SWEEP_ROUNDS = 3
LOSS_BUDGET_S = 40.0  # phase 2: wall time per run, compilation included
LOSS_ROUNDS = 2
PROFILE_S = 12.0
QUICK_SWEEP = {"window_s": 0.5, "rounds": 1, "loss_budget_s": 2.0, "loss_rounds": 1,
               "profile_s": 0.0}


@dataclass(frozen=True)
class Config:
    """One way to train the same model: what `python -m training train` can be told."""

    name: str
    backend: str = "tensorflow"
    threads: int = 0
    batch_size: int = BATCH
    seq_len: int = SEQ_LEN
    jit_compile: str = "auto"
    precision: str = "float32"
    fixed_window: bool = False
    pipeline: str = "tf.data"

    def speed(self) -> Any:
        from training.speed import Speed

        return Speed(threads=self.threads, jit_compile=self.jit_compile,  # type: ignore[arg-type]
                     precision=self.precision,  # type: ignore[arg-type]
                     fixed_window=self.fixed_window, pipeline=self.pipeline)  # type: ignore[arg-type]

    def cli_flags(self) -> str:
        """The options of `python -m training train` that select this configuration."""
        return (f"--backend {self.backend} --batch-size {self.batch_size} --seq-len "
                f"{self.seq_len} --threads {self.threads} --jit-compile {self.jit_compile} "
                f"--precision {self.precision} "
                f"{'--fixed-window' if self.fixed_window else '--any-window'} "
                f"--pipeline {self.pipeline}")


TODAY = Config("today: tf, batch 64, any window")


def sweep_configs(jax_available: bool) -> list[Config]:
    from dataclasses import replace

    fixed = replace(TODAY, name="tf fixed window", fixed_window=True)
    out = [
        TODAY,
        fixed,
        replace(fixed, name="tf fixed, 1 intra-op thread", threads=1),
        replace(fixed, name="tf fixed, batch 128", batch_size=128),
        replace(fixed, name="tf fixed, windows of 200", seq_len=200),
        replace(fixed, name="tf fixed, jit_compile", jit_compile="on"),
        replace(fixed, name="tf fixed, bf16", precision="mixed_bfloat16"),
        replace(fixed, name="tf fixed, numpy arrays", pipeline="arrays"),
    ]
    if jax_available:
        out.append(Config("jax, batch 64", backend="jax", fixed_window=True, pipeline="arrays"))
        out.append(Config("jax, batch 128", backend="jax", batch_size=128, fixed_window=True,
                          pipeline="arrays"))
    return out


def run_child(cfg: Config, corpus: str, max_chars: int | None, seed: int, mode: str,
              seconds: float) -> dict[str, Any]:
    """One configuration in a fresh process: `mode` "rate" (steady chars/s over `seconds` after
    the warm-up steps) or "loss" (train `seconds` from the start, then the validation loss)."""
    import subprocess

    from training.speed import apply_threads

    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "XLA_FLAGS")}
    env["KERAS_BACKEND"] = cfg.backend
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["JAX_PLATFORMS"] = "cpu"
    saved = dict(os.environ)
    try:  # apply_threads writes os.environ: borrow it to build the child's environment
        os.environ.clear()
        os.environ.update(env)
        apply_threads(cfg.backend, cfg.threads)
        env = dict(os.environ)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    arg = json.dumps({"config": asdict(cfg), "corpus": corpus, "max_chars": max_chars,
                      "seed": seed, "mode": mode, "seconds": seconds})
    load_before = os.getloadavg()
    res = subprocess.run([sys.executable, "-m", "bench.training", "--child", arg], env=env,
                         capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
    if res.returncode != 0:
        return {"error": res.stderr[-1500:], "load_before": load_before,
                "load_after": os.getloadavg()}
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return {**out, "load_before": load_before, "load_after": os.getloadavg()}


def child_main(arg: str) -> None:
    """The child: train one configuration and print one JSON line."""
    spec = json.loads(arg)
    cfg = Config(**spec["config"])
    import keras

    from training.model import build_training_model, copy_weights
    from training.train import compile_for_training, set_precision

    split, _ = load_split(spec["corpus"], spec["max_chars"])
    keras.utils.set_random_seed(spec["seed"])
    speed = cfg.speed()
    train_win = data.windows(split.train, cfg.seq_len)
    set_precision(speed)
    model = build_training_model(ModelConfig(vocab_size=split.vocab_size),
                                 window=cfg.seq_len if cfg.fixed_window else None)
    compile_for_training(model, LEARNING_RATE, CLIPNORM, speed)
    if cfg.backend == "tensorflow" and cfg.pipeline == "tf.data":
        kwargs: dict[str, Any] = {"x": data.dataset(train_win, cfg.batch_size, shuffle=True,
                                                    seed=spec["seed"]), "shuffle": False}
    else:
        kwargs = {"x": train_win[:, :-1], "y": train_win[:, 1:], "batch_size": cfg.batch_size,
                  "shuffle": True}
    clock = _Clock()
    seconds = float(spec["seconds"])
    rate = spec["mode"] in ("rate", "profile")

    class Stop(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            clock.step_ends.append(time.perf_counter() - self.t0)
            ends = clock.step_ends
            if rate:
                if (len(ends) > SWEEP_WARMUP_STEPS
                        and ends[-1] - ends[SWEEP_WARMUP_STEPS - 1] >= seconds):
                    self.model.stop_training = True
            elif ends[-1] >= seconds:
                self.model.stop_training = True

    if spec["mode"] == "profile":  # warm up (tracing), then trace `seconds` of steps
        import tempfile

        import tensorflow as tf

        model.fit(epochs=1, verbose=0, steps_per_epoch=SWEEP_WARMUP_STEPS, **kwargs)
        with tempfile.TemporaryDirectory() as logdir:
            tf.profiler.experimental.start(logdir)
            model.fit(epochs=1_000_000, verbose=0, callbacks=[Stop()], **kwargs)
            tf.profiler.experimental.stop()
            (xplane,) = Path(logdir).rglob("*.xplane.pb")
            print(json.dumps({"seconds": clock.step_ends[-1], "steps": len(clock.step_ends),
                              "ops": _op_profile(str(xplane))}), flush=True)
        return
    history = model.fit(epochs=1_000_000, verbose=0, callbacks=[Stop()], **kwargs)
    ends = clock.step_ends
    per_step = cfg.batch_size * cfg.seq_len  # partial batches end an epoch: counted below
    trained = windows_after(len(ends), len(train_win), cfg.batch_size) * cfg.seq_len
    out: dict[str, Any] = {"steps": len(ends), "first_step_s": ends[0], "train_s": ends[-1],
                           "chars_trained": trained,
                           "train_loss": float(history.history["loss"][-1])}
    if rate:
        w = SWEEP_WARMUP_STEPS
        steady = (windows_after(len(ends), len(train_win), cfg.batch_size)
                  - windows_after(w, len(train_win), cfg.batch_size)) * cfg.seq_len
        out["chars_per_s"] = steady / (ends[-1] - ends[w - 1])
        out["median_step_chars_per_s"] = per_step / float(np.median(np.diff(ends[w - 1:])))
    else:
        out["chars_per_s"] = trained / ends[-1]  # compilation included
        keras.mixed_precision.set_global_policy("float32")
        twin = build_training_model(ModelConfig(vocab_size=split.vocab_size))
        copy_weights(model, twin)
        t0 = time.perf_counter()
        out["val_nats"] = score_zero_state_windows(twin, split.val, SEQ_LEN).loss_nats
        out["eval_s"] = time.perf_counter() - t0
    print(json.dumps(out), flush=True)


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _spread(values: list[float]) -> float | None:
    """(max - min) / median: how far apart the rounds of one configuration were."""
    return float((max(values) - min(values)) / np.median(values)) if len(values) > 1 else None


def profile_child(cfg: Config, corpus: str, max_chars: int | None, seed: int, seconds: float,
                  out_dir: Path) -> dict[str, Any]:
    """TensorFlow's profiler over `seconds` of training of `cfg` after the warm-up steps: self
    time by op type (py-spy cannot see TensorFlow's compute threads, which run no Python)."""
    if cfg.backend != "tensorflow":
        return {"config": cfg.name, "error": "the profile reads TensorFlow's profiler"}
    res = run_child(cfg, corpus, max_chars, seed, "profile", seconds)
    return {"config": cfg.name, **{k: v for k, v in res.items()
                                   if k not in ("load_before", "load_after")}}


def _op_profile(xplane: str) -> list[dict[str, Any]]:
    """Self time by TensorFlow op type from a profiler trace (busy time only), largest first."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

    raw, ok = plugin.xspace_to_tools_data([xplane], "framework_op_stats", {})
    if not ok:
        raise RuntimeError("the profiler trace could not be read")
    table = json.loads(raw)[0]
    cols = [c["id"] for c in table["cols"]]
    kind, self_us = cols.index("type"), cols.index("total_self_time")
    by_type: dict[str, float] = {}
    for row in table["rows"]:
        cells: list[Any] = [c.get("v") if c else None for c in row["c"]]
        by_type[str(cells[kind])] = by_type.get(str(cells[kind]), 0.0) + float(cells[self_us])
    by_type.pop("IDLE", None)  # idle threads of the pools, not work
    total = sum(by_type.values()) or 1.0
    return [{"op": k, "self_ms": v / 1e3, "share": v / total}
            for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])[:12]]


def run_sweep(corpus: str, quick: bool, out: Path, seed: int) -> tuple[Path, Path]:
    import importlib.util

    from bench.common import machine_facts as common_facts
    from bench.common import write_results

    knobs = QUICK_SWEEP if quick else {
        "window_s": SWEEP_WINDOW_S, "rounds": SWEEP_ROUNDS, "loss_budget_s": LOSS_BUDGET_S,
        "loss_rounds": LOSS_ROUNDS, "profile_s": PROFILE_S}
    max_chars = QUICK_CHARS if quick else None
    started = time.perf_counter()
    load_before = os.getloadavg()
    jax_ok = importlib.util.find_spec("jax") is not None
    configs = sweep_configs(jax_ok)
    if quick:
        configs = [c for c in configs if c.name in (TODAY.name, "tf fixed window")
                   or c.backend == "jax"][:3]
    rates: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
    for rnd in range(int(knobs["rounds"])):
        order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]  # rotated
        for c in order:
            res = run_child(c, corpus, max_chars, seed, "rate", float(knobs["window_s"]))
            rates[c.name].append(res)
            shown = (f"{res['chars_per_s']:,.0f} chars/s" if "chars_per_s" in res
                     else f"failed: {res['error'][-300:]}")
            print(f"round {rnd + 1} {c.name}: {shown}, load {res['load_before'][0]:.2f}",
                  flush=True)
    rows: list[dict[str, Any]] = []
    for c in configs:
        ok = [x["chars_per_s"] for x in rates[c.name] if "chars_per_s" in x]
        rows.append({"config": asdict(c), "name": c.name, "cli": c.cli_flags(),
                     "chars_per_s": ok, "median_chars_per_s": _median(ok), "spread": _spread(ok),
                     "runs": rates[c.name]})
    today = next(r for r in rows if r["name"] == TODAY.name)
    ranked = sorted((r for r in rows if r["median_chars_per_s"]),
                    key=lambda r: -r["median_chars_per_s"])
    fastest = next((r for r in ranked if r["name"] != TODAY.name), ranked[0])
    # A larger batch or window trains more characters per second but takes fewer optimizer
    # steps per character, which can cost loss at equal time: the fastest that keeps today's
    # batch and window (the same updates per character) is tried for loss too.
    same_steps = next((r for r in ranked if r["name"] != TODAY.name
                       and r["config"]["batch_size"] == TODAY.batch_size
                       and r["config"]["seq_len"] == TODAY.seq_len), fastest)
    for r in rows:
        if r["median_chars_per_s"] and today["median_chars_per_s"]:
            r["vs_today"] = r["median_chars_per_s"] / today["median_chars_per_s"]

    # Phase 2: loss after equal wall time, today's default against the candidates, alternating.
    pair = [Config(**r["config"]) for r in {r["name"]: r for r in (today, fastest, same_steps)
                                            }.values()]
    losses: dict[str, list[dict[str, Any]]] = {c.name: [] for c in pair}
    for rnd in range(int(knobs["loss_rounds"])):
        for c in (pair if rnd % 2 == 0 else pair[::-1]):
            res = run_child(c, corpus, max_chars, seed, "loss", float(knobs["loss_budget_s"]))
            losses[c.name].append(res)
            shown = (f"val {res['val_nats']:.4f} nats/char, {res['chars_per_s']:,.0f} chars/s"
                     if "val_nats" in res else f"failed: {res['error'][-300:]}")
            print(f"loss round {rnd + 1} {c.name}: {shown}", flush=True)
    loss_rows: list[dict[str, Any]] = []
    for c in pair:
        ok = [x for x in losses[c.name] if "val_nats" in x]
        loss_rows.append({"name": c.name, "budget_s": knobs["loss_budget_s"],
                          "val_nats": [x["val_nats"] for x in ok],
                          "median_val_nats": _median([x["val_nats"] for x in ok]),
                          "chars_per_s": [x["chars_per_s"] for x in ok],
                          "median_chars_per_s": _median([x["chars_per_s"] for x in ok]),
                          "runs": losses[c.name]})

    # The new default: the fastest candidate whose median loss is no worse than today's.
    base = loss_rows[0]["median_val_nats"]
    keeps = [r["name"] for r in loss_rows[1:] if base is not None
             and r["median_val_nats"] is not None and r["median_val_nats"] <= base]
    chosen = next((r["name"] for r in ranked if r["name"] in keeps), TODAY.name)
    # TensorFlow's profiler: the fastest TensorFlow configuration.
    traced = next((r for r in ranked if r["config"]["backend"] == "tensorflow"), today)
    profile = (profile_child(Config(**traced["config"]), corpus, max_chars, seed,
                             float(knobs["profile_s"]), out)
               if knobs["profile_s"] else {"skipped": "quick run"})
    report = {
        "benchmark": "training-sweep",
        "date": date.today().isoformat(),
        "command": " ".join(["python -m bench.training", *sys.argv[1:]]),
        "quick": quick,
        "knobs": knobs,
        "warmup_steps": SWEEP_WARMUP_STEPS,
        "model": "Embedding(64) -> 2 x LSTM(256), dropout 0.2 -> Dense (models/shakespeare)",
        "optimizer": f"Adam({LEARNING_RATE}, clipnorm {CLIPNORM})",
        "machine": common_facts(),
        "keras_backends": {"tensorflow": True, "jax": jax_ok, "torch": False},
        "torch": "not installed: PyPI's Linux torch wheel (539 MB for 2.15.0) requires the CUDA "
                 "13 toolkit and cuDNN wheels (several GB); the CPU-only build is on "
                 "download.pytorch.org, which this machine cannot reach",
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
        "throughput": rows,
        "fastest": fastest["name"],
        "fastest_same_steps": same_steps["name"],
        "chosen": chosen,
        "loss_at_equal_time": loss_rows,
        "profile": profile,
    }
    return write_results(out, "training-sweep", quick, report, render_sweep(report))


def render_sweep(report: dict[str, Any]) -> str:
    m = report["machine"]
    k = report["knobs"]
    lines = [
        f"# Training throughput per configuration: {m['hostname']}, {report['date']}",
        "",
        f"`{report['command']}`, {report['wall_s'] / 60:.1f} minutes. Model: {report['model']}; "
        f"{report['optimizer']}; tinyshakespeare's first 90% trained. Machine: {m['cpu']}, "
        f"{m['cpu_count_logical']} CPUs, shared with other jobs: load average "
        f"{_load(report['load_before'])} before, {_load(report['load_after'])} after.",
        "",
        f"Phase 1: target characters per second over {k['window_s']:g} s of training after "
        f"{report['warmup_steps']} warm-up steps (tracing and compilation excluded); each "
        f"configuration in a process of its own, {k['rounds']} rounds in rotated order; median "
        "and spread ((max − min) / median) over the rounds.",
        "",
        "| configuration | median target chars/s | vs today | rounds | spread | CLI |",
        "|---|---:|---:|---|---:|---|",
    ]
    for r in sorted(report["throughput"], key=lambda r: -(r["median_chars_per_s"] or 0)):
        med = r["median_chars_per_s"]
        lines.append(
            f"| {r['name']} | {med:,.0f} | {r.get('vs_today', 0):.2f}× | "
            f"{', '.join(f'{x:,.0f}' for x in r['chars_per_s'])} | "
            f"{(r['spread'] or 0) * 100:.0f}% | `{r['cli']}` |" if med else
            f"| {r['name']} | failed | | | | `{r['cli']}` |")
    lines += [
        "",
        f"Phase 2: today's default, the fastest ({report['fastest']}) and the fastest with "
        f"today's batch and window ({report['fastest_same_steps']}) each trained "
        f"{k['loss_budget_s']:g} s of wall time from the start (compilation included), "
        f"{k['loss_rounds']} rounds alternating, then scored on the whole validation split "
        "(windows of 100 from a zero state, training's val_loss). Chosen as the CPU default: "
        f"**{report['chosen']}**, the fastest whose median loss is no worse than today's.",
        "",
        "| configuration | val loss after equal time, nats/char (median; rounds) | chars/s "
        "over the whole time (median) |",
        "|---|---:|---:|",
    ]
    for r in report["loss_at_equal_time"]:
        vals = ", ".join(f"{v:.4f}" for v in r["val_nats"])
        med = r["median_val_nats"]
        lines.append(f"| {r['name']} | {med:.4f} ({vals}) | "
                     f"{r['median_chars_per_s'] or 0:,.0f} |" if med is not None
                     else f"| {r['name']} | failed | |")
    prof = report["profile"]
    if prof.get("ops"):
        lines += ["", f"Profile of the fastest on TensorFlow ({prof['config']}; TensorFlow's "
                  f"profiler over "
                  f"{prof['steps']} steps after the warm-up): self time by op type, all "
                  f"threads, share of the busy time. {prof.get('note', '')}", "",
                  "| op type | self time, ms | share |", "|---|---:|---:|"]
        lines += [f"| `{x['op']}` | {x['self_ms']:,.0f} | {x['share'] * 100:.1f}% |"
                  for x in prof["ops"]]
    elif prof:
        lines += ["", f"Profile: {json.dumps(prof)[:300]}"]
    lines += ["", f"Torch: {report['torch']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"training seconds per scheme (default {DEFAULT_BUDGET_S:g}, "
                        f"{QUICK_BUDGET_S:g} with --quick)")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS),
                   help="text file, or a named corpus (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"the first {QUICK_CHARS:,} characters and a tiny budget: a smoke run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                   help="folder for the results (default: %(default)s)")
    p.add_argument("--val-stride", type=int, default=None,
                   help="score the character after every n-th 60-char validation window "
                        f"(default {DEFAULT_VAL_STRIDE}, {QUICK_VAL_STRIDE} with --quick; 1 = all)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--schemes", action="store_true",
                   help="compare our training scheme with the Keras example's (issue 3) "
                   "instead of the configuration sweep")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quiet_tensorflow()  # before TensorFlow is imported: no CUDA errors on a CPU-only host
    if args.child is not None:
        child_main(args.child)
        return
    if not args.schemes:
        run_sweep(args.corpus, args.quick, args.out, args.seed)
        return
    budget = args.budget_s if args.budget_s is not None else (
        QUICK_BUDGET_S if args.quick else DEFAULT_BUDGET_S)
    stride = args.val_stride if args.val_stride is not None else (
        QUICK_VAL_STRIDE if args.quick else DEFAULT_VAL_STRIDE)
    if budget <= 0 or stride < 1:
        p.error("--budget-s must be > 0 and --val-stride >= 1")
    json_path, md_path = run(budget, args.corpus, args.quick, args.out, stride, args.seed)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
