"""`train`: corpus -> windows -> Keras char-RNN -> best checkpoint, with logs, plots and samples."""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.vocab import Vocabulary
from training import corpus as corpus_mod
from training import data
from training.model import ModelConfig, build_inference_model, build_training_model, copy_weights

SAMPLE_TEMPERATURES = (0.2, 0.5, 1.0, 1.2)
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
# Best weights only: small and backend-agnostic; export rebuilds the model from config.json.
BEST_FILE = "best.weights.h5"
LAST_FILE = "last.keras"
LOG_FILE = "log.csv"
PLOT_FILE = "loss.png"
SAMPLES_FILE = "samples.txt"


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed with the given corpus or options."""


@dataclass
class TrainOptions:
    corpus: list[str]
    run_dir: Path
    lowercase: bool = False
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
    verbose: int = 1
    command: list[str] = field(default_factory=lambda: list(sys.argv))


def _strategy(opts: TrainOptions) -> Any:
    """MirroredStrategy over every GPU (or over `cpu_devices` logical CPUs); else the default."""
    import tensorflow as tf

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
    return saved


class _EpochReport:
    """Shared per-epoch bookkeeping: bits/char, chars/s, samples, plot, resume state."""

    def __init__(self, opts: TrainOptions, cfg: ModelConfig, vocab: Vocabulary,
                 val_ids: np.ndarray, train_chars: int) -> None:
        self.opts, self.cfg, self.vocab = opts, cfg, vocab
        self.val_ids, self.train_chars = val_ids, train_chars
        self.rng = np.random.default_rng(opts.seed)
        self.t0 = 0.0
        self.t_train = 0.0

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
                report.epoch_end(self.model, epoch, logs if logs is not None else {})

        run = self.opts.run_dir
        best = keras.callbacks.ModelCheckpoint(
            str(run / BEST_FILE), monitor="val_loss", save_best_only=True, save_weights_only=True,
            verbose=0,
            initial_value_threshold=initial_best if math.isfinite(initial_best) else None,
        )
        return [
            Report(),  # first, so CSVLogger sees the extra columns
            best,
            keras.callbacks.ModelCheckpoint(str(run / LAST_FILE), verbose=0),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1,
                                              min_lr=1e-5, verbose=self.opts.verbose),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.opts.patience,
                                          verbose=self.opts.verbose),
            keras.callbacks.CSVLogger(str(run / LOG_FILE), append=True),
        ]

    def epoch_end(self, model: Any, epoch: int, logs: dict[str, Any]) -> None:
        seconds = self.t_train or (time.perf_counter() - self.t0)
        logs["bpc"] = float(logs["loss"]) / math.log(2)
        logs["val_bpc"] = float(logs["val_loss"]) / math.log(2)
        logs["chars_per_s"] = self.train_chars / max(seconds, 1e-9)
        print(
            f"epoch {epoch + 1}: loss {logs['loss']:.4f} nats/char ({logs['bpc']:.3f} bits), "
            f"val {logs['val_loss']:.4f} nats/char ({logs['val_bpc']:.3f} bits), "
            f"{logs['chars_per_s']:,.0f} chars/s",
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
        print(block, flush=True)
        with (self.opts.run_dir / SAMPLES_FILE).open("a", encoding="utf-8") as f:
            f.write(block)


def read_log(csv_path: Path) -> list[dict[str, str]]:
    """Rows of a run's log.csv (CSVLogger), oldest first; none if there is no log yet."""
    import csv

    if not csv_path.exists():
        return []
    with csv_path.open() as f:
        return list(csv.DictReader(f))


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


def train(opts: TrainOptions) -> Path:
    """Train (or resume) into opts.run_dir; returns the best checkpoint's path."""
    import keras

    corpus = corpus_mod.load(opts.corpus, lowercase=opts.lowercase)
    vocab = Vocabulary.from_text([corpus.text])
    ids = vocab.encode(corpus.text)
    train_ids, val_ids = data.split(ids, opts.val_fraction)
    train_win = data.windows(train_ids, opts.seq_len)
    val_win = data.windows(val_ids, opts.seq_len)
    opts.run_dir.mkdir(parents=True, exist_ok=True)

    initial_epoch = 0
    if opts.resume:
        saved = _check_resume(opts.run_dir, vocab, opts)
        cfg = ModelConfig(**saved["model"])
        initial_epoch = json.loads((opts.run_dir / STATE_FILE).read_text())["epochs_done"]
    else:
        cfg = ModelConfig(vocab_size=len(vocab), cell=opts.cell,  # type: ignore[arg-type]
                          layers=opts.layers, units=opts.units,
                          embedding_dim=opts.embedding_dim, dropout=opts.dropout)
        for stale in (LOG_FILE, SAMPLES_FILE, STATE_FILE, BEST_FILE, LAST_FILE):
            (opts.run_dir / stale).unlink(missing_ok=True)
        (opts.run_dir / CONFIG_FILE).write_text(json.dumps({
            "model": cfg.to_dict(),
            "vocab": vocab.chars,
            "lowercase": opts.lowercase,
            "corpus": {"name": corpus.name, "files": corpus.files, "sha256": corpus.sha256,
                       "characters": len(corpus.text)},
            "seq_len": opts.seq_len,
            "val_fraction": opts.val_fraction,
            "batch_size": opts.batch_size,
            "learning_rate": opts.learning_rate,
            "seed": opts.seed,
            "command": shlex.join(opts.command),
            "backend": keras.backend.backend(),
        }, indent=2))

    keras.utils.set_random_seed(opts.seed + initial_epoch)
    report = _EpochReport(opts, cfg, vocab, val_ids, train_chars=train_win[:, 1:].size)
    callbacks = report.make_callbacks(_best_so_far(opts.run_dir / LOG_FILE))
    fit_kwargs: dict[str, Any] = {
        "epochs": opts.epochs, "initial_epoch": initial_epoch, "callbacks": callbacks,
        "verbose": opts.verbose, "steps_per_epoch": opts.steps_per_epoch,
    }

    def build() -> Any:
        if opts.resume:
            return keras.models.load_model(opts.run_dir / LAST_FILE)
        model = build_training_model(cfg)
        model.compile(
            optimizer=keras.optimizers.Adam(opts.learning_rate, clipnorm=opts.clipnorm),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    if keras.backend.backend() == "tensorflow":
        strategy = _strategy(opts)
        with strategy.scope():
            model = build()
        n_rep = strategy.num_replicas_in_sync
        print(f"training on {n_rep} replica(s) with {type(strategy).__name__}", flush=True)
        train_ds = data.dataset(train_win, opts.batch_size, shuffle=True, seed=opts.seed)
        val_ds = data.dataset(val_win, opts.batch_size, shuffle=False, seed=opts.seed)
        if opts.steps_per_epoch:
            train_ds = train_ds.repeat()
        model.fit(train_ds, validation_data=val_ds, **fit_kwargs)
    else:
        # Other Keras backends (JAX on a GPU host without TensorFlow): same model, numpy input.
        model = build()
        model.fit(train_win[:, :-1], train_win[:, 1:], batch_size=opts.batch_size, shuffle=True,
                  validation_data=(val_win[:, :-1], val_win[:, 1:]),
                  validation_batch_size=opts.batch_size, **fit_kwargs)
    return opts.run_dir / BEST_FILE
