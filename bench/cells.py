"""GRU against LSTM at equal parameter counts: raw decode and the engine, in one run.

    python -m bench.cells [--batches 1,64,256] [--rounds 5] [--quick]

Builds two models with the project's CLI (train, export) on the first 100,000 characters of
tinyshakespeare, a few training steps each: decode speed does not depend on how well a model is
trained. 2 x LSTM(256) is models/shakespeare's shape (874,881 parameters); 2 x GRU(296) has
872,393 (Keras's reset_after GRU, exported as ONNX's fused GRU op with linear_before_reset=1).
For each batch size B, rounds interleave, for each model:

    host    OnnxModel.step + app.sampling per character (bench.ceiling's `fp32 host`)
    graph   the decode graph with K = 8, sampling in the graph (the service's default)
    engine  app.engine's EngineCore with that decode graph: B requests admitted together, each
            `chars` characters from a one-character seed (the engine process's loop, minus
            its socket)

Each round's GRU time is divided by the same round's LSTM time; tables give medians.
Writes <out>/cells-<host>-<YYYYMMDD>.{json,md} and prints the Markdown.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.artifact import read_metadata
from app.decode import serving_decode_graphs
from app.engine.batch import Sequence
from app.engine.core import EngineCore
from app.engine.messages import GenerationRequest, Sampling
from app.runtime import OnnxModel, load_model
from bench.ceiling import OPTIONS, Runner, chars_per_round, graph_runner, host_runner
from bench.common import (
    ROOT,
    int_list,
    load_average,
    machine_facts,
    md_table,
    write_results,
)
from bench.serving import run_checked

CORPUS_CHARS = 100_000
STEPS = 8  # the decode graph K the service uses by default (CHARLSTM_DECODE_STEPS)
SHAPES = {"lstm": 256, "gru": 296}  # units per layer, 2 layers, embedding 64: ~875k parameters


@dataclass(frozen=True)
class Config:
    batches: list[int]
    rounds: int
    corpus: Path
    out: Path
    quick: bool


def build(work: Path, corpus: Path, cell: str, units: int, quick: bool) -> Path:
    text = work / "corpus.txt"
    if not text.exists():
        text.write_text(corpus.read_text(encoding="utf-8")[:CORPUS_CHARS], encoding="utf-8")
    run = work / f"run-{cell}"
    python = sys.executable
    run_checked([python, "-m", "training", "train", str(text), "-o", str(run), "--cell", cell,
                 "--layers", "2", "--units", str(units), "--epochs", "1", "--steps-per-epoch",
                 "2" if quick else "20", "--sample-length", "20", "--quiet"],
                f"training the {cell} model")
    run_checked([python, "-m", "training", "export", str(run), "--name", cell, "--models-dir",
                 str(work / "models")], f"exporting the {cell} model")
    return work / "models" / cell


def engine_runner(model: OnnxModel) -> Runner:
    graphs = serving_decode_graphs(model, STEPS, OPTIONS)
    if graphs is None:
        raise SystemExit(f"{model.dir}: export wrote no decode graph with K={STEPS}")

    def run(batch: int, chars: int) -> float:
        core = EngineCore(model, max_batch=batch, max_queue=batch, decode=graphs)
        seed = model.vocab.encode("\n")
        seqs = [Sequence(GenerationRequest(seed_ids=seed.tolist(), max_new=chars,
                                           sampling=Sampling(seed=i)))
                for i in range(batch)]
        t0 = time.perf_counter()
        for s in seqs:
            core.submit(s)
        while core.has_work:
            core.iterate()
            core.touched.clear()  # what a driver does after reading the news
        return time.perf_counter() - t0

    return run


def measure(cfg: Config, runners: dict[tuple[str, str], Runner]) -> list[dict[str, Any]]:
    rows = []
    kinds = list(dict.fromkeys(kind for _, kind in runners))
    for batch in cfg.batches:
        chars = chars_per_round(batch, cfg.quick, [STEPS])
        for run in runners.values():  # warm-up: first calls allocate
            run(batch, STEPS)
        seconds: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
        for r in range(cfg.rounds):
            keys = list(runners)
            keys = keys[r % len(keys):] + keys[:r % len(keys)]  # no fixed neighbour
            for key in keys:
                seconds[key].append(runners[key](batch, chars))
        for kind in kinds:
            lstm, gru = seconds[("lstm", kind)], seconds[("gru", kind)]
            row = {"batch": batch, "kind": kind, "chars_per_round": chars, "rounds": cfg.rounds,
                   "lstm_chars_per_s": round(statistics.median(batch * chars / x
                                                               for x in lstm), 1),
                   "gru_chars_per_s": round(statistics.median(batch * chars / x for x in gru), 1),
                   "gru_speed_over_lstm": round(statistics.median(
                       a / b for a, b in zip(lstm, gru, strict=True)), 3)}
            rows.append(row)
            print(f"batch {batch:4d} {kind:6s} lstm {row['lstm_chars_per_s']:>10,.0f} gru "
                  f"{row['gru_chars_per_s']:>10,.0f} chars/s, gru/lstm "
                  f"x{row['gru_speed_over_lstm']:.2f}", file=sys.stderr, flush=True)
    return rows


def markdown(report: dict[str, Any]) -> str:
    m, models = report["meta"], report["models"]
    lines = [f"# GRU vs LSTM at equal parameters: decode speed on {m['hostname']}, "
             f"{m['started'][:10]}", "",
             f"{m['cpu']}, {m['cpu_count_logical']} logical CPUs; load average "
             f"{m['loadavg_start']} at start, {m['loadavg_end']} at end; onnxruntime "
             f"{m['onnxruntime']}, CPU provider, 1 intra-op thread. Medians "
             f"over {report['settings']['rounds']} interleaved rounds; the ratio is GRU speed / "
             "LSTM speed per round.", "",
             md_table(["cell", "shape", "parameters", "ONNX recurrent op", "decode graph"],
                      [[c, v["shape"], f"{v['parameters']:,}", v["op"], v["decode_graph"]]
                       for c, v in models.items()]), "",
             "Characters per second (all rows together):", "",
             md_table(["batch", "level", "LSTM chars/s", "GRU chars/s", "GRU / LSTM"],
                      [[r["batch"], r["kind"], f"{r['lstm_chars_per_s']:,.0f}",
                        f"{r['gru_chars_per_s']:,.0f}", f"**{r['gru_speed_over_lstm']:.2f}**"]
                       for r in report["results"]]), "",
             "host = step graph + host sampling per character; graph = the K = 8 decode graph; "
             "engine = EngineCore driving that graph (admission, bookkeeping, stops off).", ""]
    return "\n".join(lines)


def recurrent_op(folder: Path) -> str:
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    ops = sorted({n.op_type for n in graph.node if n.op_type in ("LSTM", "GRU", "Loop")})
    return ", ".join(ops)


def run(cfg: Config) -> dict[str, Any]:
    meta = {**machine_facts(), "loadavg_start": load_average()}
    with tempfile.TemporaryDirectory(prefix="cells-") as tmp:
        work = Path(tmp)
        runners: dict[tuple[str, str], Runner] = {}
        models: dict[str, Any] = {}
        for cell, units in SHAPES.items():
            folder = build(work, cfg.corpus, cell, units, cfg.quick)
            model = load_model(folder, OPTIONS)
            info = read_metadata(folder).architecture
            graphs = serving_decode_graphs(model, STEPS, OPTIONS)
            models[cell] = {"shape": f"2 x {cell.upper()}({units})",
                            "parameters": info.parameters, "op": recurrent_op(folder),
                            "decode_graph": graphs.files if graphs else None}
            runners[(cell, "host")] = host_runner(model)
            assert graphs is not None
            runners[(cell, "graph")] = graph_runner(model, graphs.steps)
            runners[(cell, "engine")] = engine_runner(model)
        results = measure(cfg, runners)
    meta["loadavg_end"] = load_average()
    return {"meta": meta, "settings": {"batches": cfg.batches, "rounds": cfg.rounds,
                                       "steps": STEPS, "corpus_chars": CORPUS_CHARS},
            "models": models, "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cells",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batches", type=int_list, default="1,64,256", help="batch sizes")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per batch size")
    p.add_argument("--corpus", type=Path,
                   default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--quick", action="store_true", help="2 rounds, 16 chars: a smoke test")
    args = p.parse_args(argv)
    cfg = Config(batches=args.batches, rounds=2 if args.quick else args.rounds,
                 corpus=args.corpus, out=args.out, quick=args.quick)
    report = run(cfg)
    write_results(cfg.out, "cells", cfg.quick, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
