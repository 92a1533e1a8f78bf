"""`train`: corpus -> windows -> Keras char-RNN -> best checkpoint, with logs, plots and samples.

Two ways through the text per epoch: independent windows of T characters, shuffled, each from
a zero state (the default, char-rnn's targets with Keras's usual batching); or, with `stateful`,
B parallel streams read in order with the LSTM state carried from window to window (truncated
BPTT over the whole text, as char-rnn trains), reset at each epoch start. Validation is the same
in both: windows of T from a zero state, so runs compare.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app.vocab import Vocabulary
from training import corpus as corpus_mod
from training import data
from training.display import for_terminal, name_chars
from training.model import (
    ModelConfig,
    build_inference_model,
    build_training_model,
    copy_weights,
    reset_states,
)
from training.speed import Speed, keras_jit

SAMPLE_TEMPERATURES = (0.2, 0.5, 1.0, 1.2)
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
# Best weights only: small and backend-agnostic; export rebuilds the model from config.json.
BEST_FILE = "best.weights.h5"
LAST_FILE = "last.keras"
LOG_FILE = "log.csv"
PLOT_FILE = "loss.png"
SAMPLES_FILE = "samples.txt"
RUN_FILES = (CONFIG_FILE, STATE_FILE, BEST_FILE, LAST_FILE, LOG_FILE, PLOT_FILE, SAMPLES_FILE)


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed with the given corpus or options."""


class RunExistsError(ValueError):
    """A new run asked for in a folder that already holds one."""


@dataclass
class TrainOptions:
    corpus: list[str]
    run_dir: Path
    lowercase: bool = False
    normalization: str | None = None  # NFC / NFKC (app.vocab.normalize), after lowercasing
    cell: str = "lstm"
    layers: int = 2
    units: int = 256
    embedding_dim: int = 64
    dropout: float = 0.2
    seq_len: int = 100
    batch_size: int = 64
    epochs: int = 20
    learning_rate: float = 2e-3
    clipnorm: float = 5.0
    val_fraction: float = 0.1
    patience: int = 4
    seed: int = 1234
    resume: bool = False
    distribute: str = "auto"
    cpu_devices: int = 0
    sample_length: int = 200
    steps_per_epoch: int | None = None
    stateful: bool = False  # B = batch_size streams, state carried across windows
    force: bool = False  # start over in a run folder that holds a run
    # 0: a line per epoch; 1: and Keras's progress bar (a terminal); 2: a line per epoch and
    # the callbacks' messages, no control codes (a log file or a pipe).
    verbose: int = 1
    command: list[str] = field(default_factory=lambda: list(sys.argv))
    speed: Speed = field(default_factory=Speed)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path  # best weights by validation loss
    best_epoch: int | None  # counted from 1; None when no epoch has been trained
    best_val_loss: float | None  # nats/char, windows of seq_len from a zero state
    # Target characters trained per second of training (validation and samples not counted),
    # over the epochs of this run; None when none was trained.
    chars_per_s: float | None = None


def _strategy(opts: TrainOptions) -> Any:
    """MirroredStrategy over every GPU (or over `cpu_devices` logical CPUs); else the default."""
    import tensorflow as tf

    if opts.stateful:
        # One carried state per stream: replicas would each need their own slice of streams.
        if opts.distribute == "mirrored" or opts.cpu_devices > 1:
            raise ValueError("stateful training runs on one device: drop --distribute mirrored "
                             "and --cpu-devices")
        return tf.distribute.get_strategy()
    if opts.cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(opts.cpu_devices)]
        )
    gpus = tf.config.list_logical_devices("GPU")
    if opts.distribute == "none":
        return tf.distribute.get_strategy()
    if gpus and (len(gpus) > 1 or opts.distribute == "mirrored"):
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    cpus = tf.config.list_logical_devices("CPU")
    if opts.distribute == "mirrored" or (opts.distribute == "auto" and len(cpus) > 1):
        return tf.distribute.MirroredStrategy([d.name for d in cpus])
    return tf.distribute.get_strategy()


def _check_resume(run_dir: Path, vocab: Vocabulary, opts: TrainOptions) -> dict[str, Any]:
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.exists() or not (run_dir / LAST_FILE).exists():
        raise ResumeError(f"{run_dir}: nothing to resume (needs {CONFIG_FILE} and {LAST_FILE})")
    saved: dict[str, Any] = json.loads(cfg_path.read_text())
    saved_vocab = Vocabulary(saved["vocab"])
    if saved_vocab != vocab:
        only_ckpt, only_corpus = saved_vocab.difference(vocab)
        raise ResumeError(
            "the corpus vocabulary differs from the checkpoint's: "
            f"only in the checkpoint: {only_ckpt!r}; only in the corpus: {only_corpus!r}. "
            "Train a new model for this corpus, or use text with the same characters."
        )
    if bool(saved["lowercase"]) != opts.lowercase:
        raise ResumeError(f"the checkpoint was trained with lowercase={saved['lowercase']}")
    if saved.get("normalization") != opts.normalization:
        raise ResumeError(f"the checkpoint was trained with --normalize "
                          f"{saved.get('normalization') or 'none'}")
    return saved


def report_vocabulary(vocab: Vocabulary, train_ids: npt.NDArray[np.int32],
                      val_ids: npt.NDArray[np.int32]) -> list[str]:
    """Print the vocabulary's size, and warn about characters that occur only in the validation
    split: no training window has them, as input or target, so the model learns to give them
    almost no probability, and the validation loss pays for each. Returns those characters,
    the most frequent in validation first."""
    print(f"vocabulary: {len(vocab):,} characters ({len(train_ids):,} training, "
          f"{len(val_ids):,} validation characters)", flush=True)
    ids, counts = np.unique(val_ids, return_counts=True)
    only = np.isin(ids, train_ids, invert=True)
    unseen = [vocab.chars[int(i)] for i in ids[only][np.argsort(-counts[only], kind="stable")]]
    if unseen:
        print(f"warning: {len(unseen):,} of {len(vocab):,} characters occur only in the "
              f"validation split ({int(counts[only].sum()):,} of its {len(val_ids):,} "
              f"characters); the model never trains on them and can hardly predict them: "
              f"{name_chars(unseen)}", file=sys.stderr, flush=True)
    return unseen


def _check_new_run(run_dir: Path, force: bool) -> None:
    """A new run must not silently replace another's checkpoints and logs."""
    found = [f for f in RUN_FILES if (run_dir / f).exists()]
    if found and not force:
        raise RunExistsError(
            f"{run_dir} already holds a training run ({', '.join(found)}): pass --resume to "
            "continue it, --force to start over (its checkpoints and logs are deleted), or "
            "choose another --out")


def reset_states_each_epoch() -> Any:
    """A callback for stateful training: each epoch reads every stream from its start, so
    from a zero state; within the epoch Keras carries the state from batch to batch."""
    import keras

    class ResetStates(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            reset_states(self.model)

    return ResetStates()


class _EpochReport:
    """Shared per-epoch bookkeeping: bits/char, chars/s, samples, plot, resume state."""

    def __init__(self, opts: TrainOptions, cfg: ModelConfig, vocab: Vocabulary,
                 val_ids: np.ndarray, train_chars: int,
                 validate: Callable[[Any], float] | None = None) -> None:
        self.opts, self.cfg, self.vocab = opts, cfg, vocab
        self.val_ids, self.train_chars = val_ids, train_chars
        self.validate = validate  # model -> val_loss, when fit() does not validate itself
        self.rng = np.random.default_rng(opts.seed)
        self.t0 = 0.0
        self.t_train = 0.0
        self.run_chars = 0  # over the epochs of this run, for the throughput it ends with
        self.run_seconds = 0.0

    def chars_per_s(self) -> float | None:
        return self.run_chars / self.run_seconds if self.run_seconds > 0 else None

    def make_callbacks(self, initial_best: float) -> list[Any]:
        import keras

        report = self

        class Report(keras.callbacks.Callback):  # type: ignore[misc]
            def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                report.t0 = time.perf_counter()
                report.t_train = 0.0

            def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
                # fit() validates inside the epoch; chars/s should count training time only.
                if report.t_train == 0.0:
                    report.t_train = time.perf_counter() - report.t0

            def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                logs = logs if logs is not None else {}
                if report.validate is not None:
                    # Before the callbacks below: they all read val_loss from these logs.
                    report.t_train = time.perf_counter() - report.t0
                    logs["val_loss"] = report.validate(self.model)
                report.epoch_end(self.model, epoch, logs)

        class EpochsFromOne(keras.callbacks.CSVLogger):  # type: ignore[misc]
            """log.csv counts epochs from 1, as the console and model.json do."""

            def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                super().on_epoch_end(epoch + 1, logs)

        run = self.opts.run_dir
        verbose = 1 if self.opts.verbose else 0
        best = keras.callbacks.ModelCheckpoint(
            str(run / BEST_FILE), monitor="val_loss", save_best_only=True, save_weights_only=True,
            verbose=0,
            initial_value_threshold=initial_best if math.isfinite(initial_best) else None,
        )
        # On a terminal, a line updated in place; first, so that it is cleared before the
        # epoch line and samples are printed.
        bar = [progress_line(self.opts, self.train_chars)] if self.opts.verbose == 1 else []
        return [
            *bar,
            Report(),  # before the others: it adds val_loss (stateful) and the extra columns
            *([reset_states_each_epoch()] if self.opts.stateful else []),
            best,
            keras.callbacks.ModelCheckpoint(str(run / LAST_FILE), verbose=0),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1,
                                              min_lr=1e-5, verbose=verbose),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.opts.patience,
                                          verbose=verbose),
            EpochsFromOne(str(run / LOG_FILE), append=True),
        ]

    def epoch_end(self, model: Any, epoch: int, logs: dict[str, Any]) -> None:
        seconds = self.t_train or (time.perf_counter() - self.t0)
        self.run_chars += self.train_chars
        self.run_seconds += seconds
        logs["bpc"] = float(logs["loss"]) / math.log(2)
        logs["val_bpc"] = float(logs["val_loss"]) / math.log(2)
        logs["chars_per_s"] = self.train_chars / max(seconds, 1e-9)
        print(
            f"epoch {epoch + 1}/{self.opts.epochs}: loss {logs['loss']:.4f} nats/char "
            f"({logs['bpc']:.3f} bits), "
            f"val {logs['val_loss']:.4f} nats/char ({logs['val_bpc']:.3f} bits), "
            f"{logs['chars_per_s']:,.0f} chars/s, {_duration(seconds)}",
            flush=True,
        )
        self.write_samples(model, epoch)
        state = {"epochs_done": epoch + 1}
        (self.opts.run_dir / STATE_FILE).write_text(json.dumps(state))
        plot_history(self.opts.run_dir / LOG_FILE, self.opts.run_dir / PLOT_FILE, extra=logs,
                     epoch=epoch)

    def write_samples(self, model: Any, epoch: int) -> None:
        from training.generate import generate
        from training.keras_step import keras_step_fn

        twin = build_inference_model(self.cfg)
        copy_weights(model, twin)
        seed_len = min(60, len(self.val_ids) - 1)
        start = int(self.rng.integers(0, len(self.val_ids) - seed_len))
        seed = self.vocab.decode(self.val_ids[start : start + seed_len])
        texts = generate(keras_step_fn(twin), self.vocab, seed, SAMPLE_TEMPERATURES,
                         self.opts.sample_length, len(self.cfg.state_names()), self.cfg.units,
                         self.rng)
        lines = [f"=== epoch {epoch + 1}, seed: {seed!r}"]
        for t, text in zip(SAMPLE_TEMPERATURES, texts, strict=True):
            lines.append(f"--- temperature {t}\n{seed}{text}")
        block = "\n".join(lines) + "\n"
        print(for_terminal(block), flush=True)
        with (self.opts.run_dir / SAMPLES_FILE).open("a", encoding="utf-8") as f:
            f.write(block)


def _duration(seconds: float) -> str:
    """`42 s`, `3:07`, `1:02:09`: how long, as a person reads it."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def progress_line(opts: TrainOptions, epoch_chars: int) -> Any:
    """A Keras callback for a terminal: one line, rewritten in place a few times a second, with
    the epoch's batches, running loss, target characters per second and the time left for the
    epoch (from the rate so far). It erases itself before validation and the epoch line."""
    import keras

    class Progress(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.epoch, self.t0, self.shown = epoch, time.perf_counter(), 0.0

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            now = time.perf_counter()
            steps = self.params.get("steps") or 0
            done = batch + 1
            if now - self.shown < 0.25 and done != steps:
                return
            self.shown = now
            elapsed = now - self.t0
            rate = epoch_chars * done / max(steps, 1) / max(elapsed, 1e-9)
            left = elapsed / done * (steps - done) if steps else 0.0
            loss = (logs or {}).get("loss")
            text = (f"epoch {self.epoch + 1}/{opts.epochs}: batch {done}/{steps or '?'}"
                    + (f", loss {float(loss):.4f}" if loss is not None else "")
                    + f", {rate:,.0f} chars/s, {_duration(left)} left")
            sys.stdout.write(f"\r{text}\x1b[K")
            sys.stdout.flush()

        def clear(self) -> None:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()

        def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.clear()

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.clear()

    return Progress()


def _read_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    import csv

    if not csv_path.exists():
        return [], []
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _counts_from_zero(rows: list[dict[str, str]]) -> bool:
    """log.csv files written before epochs were counted from 1 start at epoch 0."""
    return bool(rows) and int(rows[0]["epoch"]) == 0


def read_log(csv_path: Path) -> list[dict[str, str]]:
    """Rows of a run's log.csv, oldest first; none if there is no log yet.

    `epoch` is Keras's epoch index (from 0) in every row, whichever way the file counts: the
    file counts from 1 for people, files from before that from 0.
    """
    _, rows = _read_csv(csv_path)
    shift = 0 if _counts_from_zero(rows) else 1
    return [{**r, "epoch": str(int(r["epoch"]) - shift)} for r in rows]


def migrate_log(csv_path: Path) -> bool:
    """Renumber an old log.csv (epochs from 0) from 1, in place; True if it was renumbered.

    A resumed run appends rows counted from 1, and one file must count one way.
    """
    import csv

    fields, rows = _read_csv(csv_path)
    if not _counts_from_zero(rows):
        return False
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({**r, "epoch": str(int(r["epoch"]) + 1)} for r in rows)
    tmp.replace(csv_path)
    return True


def plot_history(csv_path: Path, png_path: Path, extra: dict[str, Any], epoch: int) -> None:
    """Loss curves (nats/char) from the CSV log plus the epoch not yet flushed to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {int(r["epoch"]): (float(r["loss"]), float(r["val_loss"]))
            for r in read_log(csv_path)}
    rows[epoch] = (float(extra["loss"]), float(extra["val_loss"]))
    epochs = sorted(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e + 1 for e in epochs], [rows[e][0] for e in epochs], "o-", label="train")
    ax.plot([e + 1 for e in epochs], [rows[e][1] for e in epochs], "o-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title(png_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _best_so_far(csv_path: Path) -> float:
    return min((float(r["val_loss"]) for r in read_log(csv_path)), default=math.inf)


def best_epoch(run_dir: Path) -> TrainResult:
    """The run's best epoch by validation loss, from its log."""
    rows = read_log(run_dir / LOG_FILE)
    if not rows:
        return TrainResult(run_dir / BEST_FILE, None, None)
    best = min(rows, key=lambda r: float(r["val_loss"]))
    return TrainResult(run_dir / BEST_FILE, int(best["epoch"]) + 1, float(best["val_loss"]))


def compile_for_training(model: Any, learning_rate: float, clipnorm: float,
                         speed: Speed) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, clipnorm=clipnorm),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=keras_jit(speed.jit_compile),
    )


def set_precision(speed: Speed) -> None:
    """Keras's dtype policy for the layers built from now on (the logits stay float32)."""
    import keras

    keras.mixed_precision.set_global_policy(speed.precision)


def check_resume(opts: TrainOptions) -> None:
    """Refuse a resume whose corpus or options the run cannot take (ResumeError), without the
    backend: the CLI calls it before importing TensorFlow, so the answer comes in a second."""
    corpus = corpus_mod.load(opts.corpus, lowercase=opts.lowercase,
                             normalization=opts.normalization)
    _check_resume(opts.run_dir, Vocabulary.from_text([corpus.text]), opts)


def train(opts: TrainOptions) -> TrainResult:
    """Train (or resume) into opts.run_dir; returns the best checkpoint and its epoch."""
    if not opts.resume:
        _check_new_run(opts.run_dir, opts.force)  # before the slow imports and corpus
    import keras

    corpus = corpus_mod.load(opts.corpus, lowercase=opts.lowercase,
                             normalization=opts.normalization)
    vocab = Vocabulary.from_text([corpus.text])
    ids = vocab.encode(corpus.text)
    opts.run_dir.mkdir(parents=True, exist_ok=True)

    saved = _check_resume(opts.run_dir, vocab, opts) if opts.resume else None
    if saved is not None:
        # What the run's validation loss means (window, split) and, when stateful, its fixed
        # batch of streams are the run's own: a resume keeps them whatever the options say.
        stateful = bool(saved.get("stateful", False))
        opts = replace(opts, seq_len=int(saved["seq_len"]),
                       val_fraction=float(saved["val_fraction"]), stateful=stateful,
                       batch_size=int(saved["batch_size"]) if stateful else opts.batch_size)
    train_ids, val_ids = data.split(ids, opts.val_fraction)
    report_vocabulary(vocab, train_ids, val_ids)
    if opts.stateful and keras.backend.backend() != "tensorflow":
        raise ValueError("--stateful is implemented for the TensorFlow backend only (Keras keeps "
                         "the carried state in variables outside the model's weights)")

    initial_epoch = 0
    if saved is not None:
        cfg = ModelConfig(**saved["model"])
        initial_epoch = json.loads((opts.run_dir / STATE_FILE).read_text())["epochs_done"]
        migrate_log(opts.run_dir / LOG_FILE)
    else:
        cfg = ModelConfig(vocab_size=len(vocab), cell=opts.cell,  # type: ignore[arg-type]
                          layers=opts.layers, units=opts.units,
                          embedding_dim=opts.embedding_dim, dropout=opts.dropout)
        for stale in RUN_FILES:
            (opts.run_dir / stale).unlink(missing_ok=True)
        (opts.run_dir / CONFIG_FILE).write_text(json.dumps({
            "model": cfg.to_dict(),
            "vocab": vocab.chars,
            "lowercase": opts.lowercase,
            "normalization": opts.normalization,
            "corpus": {"name": corpus.name, "files": corpus.files, "sha256": corpus.sha256,
                       "characters": len(corpus.text)},
            "seq_len": opts.seq_len,
            "val_fraction": opts.val_fraction,
            "batch_size": opts.batch_size,
            "stateful": opts.stateful,
            "learning_rate": opts.learning_rate,
            "seed": opts.seed,
            "command": shlex.join(opts.command),
            "backend": keras.backend.backend(),
            "speed": opts.speed.to_dict(),
        }, indent=2))

    keras.utils.set_random_seed(opts.seed + initial_epoch)
    if opts.stateful:
        train_win = data.stream_windows(train_ids, opts.seq_len, streams=opts.batch_size)
    else:
        train_win = data.windows(train_ids, opts.seq_len)
    val_win = data.windows(val_ids, opts.seq_len)

    def build() -> Any:
        if opts.resume:
            # The layers keep the precision they were built with; the optimizer its state.
            model = keras.models.load_model(opts.run_dir / LAST_FILE)
            model.jit_compile = keras_jit(opts.speed.jit_compile)
            return model
        set_precision(opts.speed)
        model = build_training_model(cfg, opts.batch_size if opts.stateful else None,
                                     window=opts.seq_len if opts.speed.fixed_window else None)
        compile_for_training(model, opts.learning_rate, opts.clipnorm, opts.speed)
        return model

    def fit(model: Any, validate: Callable[[Any], float] | None,
            **data_kwargs: Any) -> _EpochReport:
        # Targets trained per epoch, for chars/s: a capped epoch trains fewer than the split.
        per_epoch = (opts.steps_per_epoch * opts.batch_size * opts.seq_len
                     if opts.steps_per_epoch else train_win[:, 1:].size)
        report = _EpochReport(opts, cfg, vocab, val_ids, train_chars=per_epoch,
                              validate=validate)
        callbacks = report.make_callbacks(_best_so_far(opts.run_dir / LOG_FILE))
        # verbose=0: on a terminal, progress_line replaces Keras's bar.
        model.fit(epochs=opts.epochs, initial_epoch=initial_epoch, callbacks=callbacks,
                  verbose=0, steps_per_epoch=opts.steps_per_epoch, **data_kwargs)
        return report

    backend = keras.backend.backend()
    print(f"speed settings: {opts.speed.describe(backend)}, batch {opts.batch_size}, "
          f"windows of {opts.seq_len}", flush=True)
    mode = f"stateful, {opts.batch_size} streams" if opts.stateful else "shuffled windows"
    if backend == "tensorflow":
        strategy = _strategy(opts)
        with strategy.scope():
            model = build()
        print(f"training on {strategy.num_replicas_in_sync} replica(s) with "
              f"{type(strategy).__name__}, Keras backend {backend}, {mode}", flush=True)
        if opts.speed.pipeline == "arrays" and not opts.stateful:
            report = fit(model, None, **array_inputs(train_win, val_win, opts.batch_size))
            return replace(best_epoch(opts.run_dir), chars_per_s=report.chars_per_s())
        # Stateful: in order, so that row j of every batch is stream j.
        train_ds = data.dataset(train_win, opts.batch_size, shuffle=not opts.stateful,
                                seed=opts.seed)
        val_ds = data.dataset(val_win, opts.batch_size, shuffle=False, seed=opts.seed)
        if opts.steps_per_epoch:
            train_ds = train_ds.repeat()
        # shuffle=False: fit's shuffle is for arrays; the dataset shuffles itself (or must not).
        if opts.stateful:
            report = fit(model, _zero_state_validation(cfg, val_ds), x=train_ds, shuffle=False)
        else:
            report = fit(model, None, x=train_ds, validation_data=val_ds, shuffle=False)
    else:
        # Other Keras backends (JAX, on a CPU or a GPU): same model, numpy input.
        model = build()
        print(f"training with Keras backend {backend}, {mode}", flush=True)
        report = fit(model, None, **array_inputs(train_win, val_win, opts.batch_size))
    return replace(best_epoch(opts.run_dir), chars_per_s=report.chars_per_s())


def array_inputs(train_win: np.ndarray, val_win: np.ndarray, batch_size: int
                 ) -> dict[str, Any]:
    """fit's arguments for numpy windows: Keras shuffles them every epoch."""
    return {"x": train_win[:, :-1], "y": train_win[:, 1:], "batch_size": batch_size,
            "shuffle": True, "validation_data": (val_win[:, :-1], val_win[:, 1:]),
            "validation_batch_size": batch_size}


def _zero_state_validation(cfg: ModelConfig, val_ds: Any) -> Callable[[Any], float]:
    """val_loss for a stateful model as fit() measures it for the others: windows of T from a
    zero state, in a stateless twin (the stateful model's batch is fixed, and validating in it
    would carry state across validation windows and into the next training batch)."""
    import keras

    twin = build_training_model(cfg)
    twin.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def validate(model: Any) -> float:
        copy_weights(model, twin)
        return float(twin.evaluate(val_ds, verbose=0, return_dict=True)["loss"])

    return validate
