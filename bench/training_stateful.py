"""`python -m bench.training_stateful`: stateful training (truncated BPTT) against today's
shuffled windows, at equal wall time (issue 15).

Both schemes train the same model (training/model.py, Embedding(64) -> LSTM -> Dense logits,
Adam(2e-3, clipnorm 5), windows of 100, batch 64, tf.data) on the first 90% of the corpus for the
same wall-clock budget, one after the other in one process:

- shuffled: `python -m training train` as shipped: windows of 100 advancing by 100, shuffled
  every epoch, each from a zero state;
- stateful: `train --stateful`: 64 parallel streams read in order, the LSTM state carried from
  each window to the next within an epoch, reset at each epoch start.

Each is then scored on the last 10% three ways (training/evaluate.py, through the Keras
inference twin): windows of 100 from a zero state (training's val_loss), windows of 256 from a
zero state (nanoGPT's block), one pass with the state carried (as the service runs).

Writes bench/results/training-stateful-<YYYYMMDD>.json and .md (`-quick` added with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import write_json
from bench.training import (
    BATCH,
    CLIPNORM,
    DEFAULT_CORPUS,
    LEARNING_RATE,
    QUICK_CHARS,
    ROOT,
    SEQ_LEN,
    Split,
    _fit,
    load_split,
    machine_facts,
    windows_after,
)
from training import data
from training.environment import quiet_tensorflow
from training.evaluate import measure_all
from training.generate import States, StepFn
from training.model import (
    ModelConfig,
    build_inference_model,
    build_training_model,
    copy_weights,
    count_parameters,
)

DEFAULT_BUDGET_S = 360.0
QUICK_BUDGET_S = 2.0
SCHEMES = ("shuffled", "stateful")


@dataclass
class StatefulResult:
    name: str
    description: str
    params: int
    train_time_s: float  # until the first step that ended past the budget
    steps: int
    epochs: float
    target_chars_per_s: float  # whole budget, tracing included
    train_loss_last_epoch: float  # running mean over the last (partial) epoch, nats/char
    measures: dict[str, dict[str, Any]]  # key -> label, window, characters, nats, bits
    eval_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


def compiled_step(twin: Any) -> StepFn:
    """The inference twin as a StepFn through predict_on_batch (a compiled graph): calling it
    eagerly steps the LSTM in Python, ~50x slower over the carried pass's long chunks."""
    names = [i.name for i in twin.inputs[1:]]

    def step(ids: np.ndarray, states: States) -> tuple[np.ndarray, States]:
        out = twin.predict_on_batch([ids.astype(np.int32), *states])
        return (np.asarray(out["logits"], np.float32),
                [np.asarray(out[f"{n}_out"], np.float32) for n in names])

    return step


def run_scheme(name: str, cfg: ModelConfig, split: Split, budget_s: float, seed: int
               ) -> StatefulResult:
    import keras

    from training.train import reset_states_each_epoch

    load_before = os.getloadavg()
    keras.utils.set_random_seed(seed)
    stateful = name == "stateful"
    if stateful:
        win = data.stream_windows(split.train, SEQ_LEN, streams=BATCH)
        model = build_training_model(cfg, stateful_batch=BATCH)
        callbacks = [reset_states_each_epoch()]
    else:
        win = data.windows(split.train, SEQ_LEN)
        model = build_training_model(cfg)
        callbacks = []
    train_ds = data.dataset(win, BATCH, shuffle=not stateful, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE, clipnorm=CLIPNORM),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clock, train_loss = _fit(model, budget_s, callbacks, x=train_ds, shuffle=False)

    t0 = time.perf_counter()
    twin = build_inference_model(cfg)
    copy_weights(model, twin)
    measures = measure_all(compiled_step(twin), [cfg.units] * len(cfg.state_names()),
                           split.val, SEQ_LEN)
    eval_s = time.perf_counter() - t0
    steps = len(clock.step_ends)
    trained = windows_after(steps, len(win), BATCH)
    description = (
        f"{BATCH} streams read in order, state carried across windows, reset each epoch"
        if stateful else "windows shuffled every epoch, each from a zero state")
    return StatefulResult(
        name=name, description=description, params=count_parameters(model),
        train_time_s=clock.step_ends[-1], steps=steps, epochs=trained / len(win),
        target_chars_per_s=trained * SEQ_LEN / clock.step_ends[-1],
        train_loss_last_epoch=train_loss,
        measures={m.key: {"label": m.label, "window": m.score.window,
                          "characters": m.score.characters, "nats": m.score.loss_nats,
                          "bits": m.score.bits_per_char} for m in measures},
        eval_s=eval_s, load_before=load_before, load_after=os.getloadavg(),
    )


def render_markdown(report: dict[str, Any]) -> str:
    m, c, model = report["machine"], report["corpus"], report["model"]
    results = [StatefulResult(**r) for r in report["schemes"]]
    base = next(r for r in results if r.name == "shuffled")
    keys = list(base.measures)
    lines = [
        f"# Stateful (truncated BPTT) vs shuffled windows at equal wall time: {report['date']}",
        "",
        f"`{report['command']}`: corpus `{c['name']}` ({c['characters']:,} characters, "
        f"vocabulary {c['vocab_size']}), first 90% trained, last 10% validated "
        f"({c['val_characters']:,}); model Embedding({model['embedding_dim']}) -> "
        f"{model['layers']} x LSTM({model['units']}), dropout {model['dropout']}; windows of "
        f"{SEQ_LEN}, batch {BATCH}, Adam({LEARNING_RATE}, clipnorm {CLIPNORM}); "
        f"{report['budget_s']:g} s of training per scheme, one after the other, under "
        f"`nice -n {report['niceness']}`.",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['platform']}; "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}. Shared with other jobs: load "
        "average per scheme below.",
        "",
        "| scheme | " + " | ".join(f"val, {base.measures[k]['label']}" for k in keys)
        + " | train loss (last epoch) | steps | epochs | target chars/s | train s | load "
        "before → after |",
        "|---|" + "---:|" * (len(keys) + 5) + "---|",
    ]
    for r in results:
        cells = []
        for k in keys:
            delta = r.measures[k]["nats"] - base.measures[k]["nats"]
            shown = f" ({delta:+.4f})" if r is not base else ""
            cells.append(f"{r.measures[k]['nats']:.4f}{shown}")
        lines.append(
            f"| {r.name} | " + " | ".join(cells) + f" | {r.train_loss_last_epoch:.4f} | "
            f"{r.steps:,} | {r.epochs:.2f} | {r.target_chars_per_s:,.0f} | "
            f"{r.train_time_s:.0f} | {r.load_before[0]:.2f} → {r.load_after[0]:.2f} |")
    lines += [
        "",
        "Losses in nats/char (bits = nats / ln 2 are in the JSON); in brackets the difference "
        "from the shuffled scheme (negative = stateful better).",
        "",
        *[f"- **{r.name}**: {r.description}." for r in results],
        "- Budget: a Keras callback stops `fit` after the first step that ends past the budget; "
        "no validation runs inside it. Scoring is not timed into the budget.",
    ]
    return "\n".join(lines) + "\n"


def run(budget_s: float, corpus: str, quick: bool, out: Path, seed: int, cfg_args: dict[str, Any]
        ) -> tuple[Path, Path]:
    split, corpus_facts = load_split(corpus, QUICK_CHARS if quick else None)
    cfg = ModelConfig(vocab_size=split.vocab_size, **cfg_args)
    results = []
    for name in SCHEMES:
        print(f"{name}: training for {budget_s:g} s ...", flush=True)
        r = run_scheme(name, cfg, split, budget_s, seed)
        results.append(r)
        print(f"{name}: {r.steps} steps, {r.epochs:.2f} epochs, " + ", ".join(
            f"{k} {v['nats']:.4f}" for k, v in r.measures.items()), flush=True)
    day = date.today()
    report = {
        "benchmark": "training-stateful",
        "date": day.isoformat(),
        "command": " ".join(["python -m bench.training_stateful", *sys.argv[1:]]),
        "quick": quick, "budget_s": budget_s, "seed": seed, "niceness": os.nice(0),
        "model": {**cfg.to_dict()}, "corpus": corpus_facts, "machine": machine_facts(),
        "schemes": [asdict(r) for r in results],
    }
    stem = out / f"training-stateful-{day:%Y%m%d}{'-quick' if quick else ''}"
    json_path, md_path = (stem.parent / f"{stem.name}.{ext}" for ext in ("json", "md"))
    write_json(json_path, report)
    md_path.write_text(render_markdown(json.loads(json_path.read_text())))
    return json_path, md_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.training_stateful", description=__doc__,
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
    p.add_argument("--layers", type=int, default=1, help="LSTM layers (default: 1)")
    p.add_argument("--units", type=int, default=128, help="units per layer (default: 128)")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout (default: 0.2)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    quiet_tensorflow()  # before TensorFlow is imported
    budget = args.budget_s if args.budget_s is not None else (
        QUICK_BUDGET_S if args.quick else DEFAULT_BUDGET_S)
    if budget <= 0:
        p.error("--budget-s must be > 0")
    json_path, md_path = run(budget, args.corpus, args.quick, args.out, args.seed,
                             {"layers": args.layers, "units": args.units,
                              "dropout": args.dropout})
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
