"""Raw decode ceiling per graph variant: host sampling vs in-graph sampling vs K steps vs int8.

    python -m bench.ceiling [--model models/shakespeare] [--batches 1,64,256] [--steps 1,4,8,16]
                            [--rounds 7] [--quick]

Every variant does the same work: B rows, each decoding `chars` characters at temperature 1
(one LSTM step and one draw per character, from a state primed with 20 random characters):

    fp32 host     OnnxModel.step on model.onnx + app.rng.uniforms + app.sampling.sample_next
                  per character: what the engine does today
    int8 host     the same on the model's int8 variant (model.int8.onnx), when listed
    fp32 graph K  a decode graph (app/decode.py): K steps and draws per onnxruntime call, the
                  uniforms of the K steps made on the host (app.decode.block_uniforms)
    int8 graph K  the same built from the int8 variant

Decode graphs are built fresh (and checked against the host, training/decode_artifact.py) in a
temporary copy of the model folder, for every K asked. Variants run interleaved round by round,
so a noisy machine slows them alike; each round's throughput is divided by that round's
`fp32 host`, and the tables give medians over rounds. `agreement` counts rows on which the
K = 1 graph and the host sampler pick the same id, over many random rows and parameter mixes.

Writes <out>/ceiling-<host>-<YYYYMMDD>.{json,md} and prints the Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app import rng
from app.artifact import read_metadata
from app.decode import DecodeGraph, block_uniforms, load_decode_graph
from app.runtime import OnnxModel, RuntimeOptions, load_model
from app.sampling import sample_next
from bench.common import (
    ROOT,
    int_list,
    load_average,
    machine_facts,
    md_table,
    shown,
    write_results,
)

PRIME_CHARS = 20
OPTIONS = RuntimeOptions(device="cpu", intra_op_threads=1)  # the service's default
AGREEMENT_SEEDS = 5


@dataclass(frozen=True)
class Config:
    model: Path
    batches: list[int]
    steps: list[int]
    rounds: int
    chars: dict[int, int]  # characters per row per round, by batch size
    agreement_rows: int
    out: Path
    quick: bool


def chars_per_round(batch: int, quick: bool, steps: list[int]) -> int:
    """About 50-150 ms of work per variant and round on a 2-core CPU; a multiple of every K."""
    base = 16 if quick else (512 if batch == 1 else 128 if batch <= 64 else 64)
    lcm = int(np.lcm.reduce(steps))
    return max(lcm, base // lcm * lcm)


Runner = Callable[[int, int], float]  # (batch, chars) -> seconds


def primed(model: OnnxModel, batch: int) -> list[Any]:
    ids = np.random.default_rng(0).integers(0, len(model.vocab), (batch, PRIME_CHARS))
    zeros = [np.zeros((batch, n), np.float32) for n in model.state_sizes]
    return model.run_numpy(ids.astype(np.int32), zeros)[1]


def host_runner(model: OnnxModel) -> Runner:
    def run(batch: int, chars: int) -> float:
        temperature = np.ones(batch, np.float32)
        top_k, top_p = np.zeros(batch, np.int64), np.ones(batch, np.float32)
        keys, counters = rng.row_keys(np.arange(batch)), np.zeros(batch, np.uint64)
        states = model.states_from_host(primed(model, batch))
        last = np.zeros((batch, len(model.vocab)), np.float32)
        t0 = time.perf_counter()
        for _ in range(chars):
            nxt = sample_next(last, temperature, top_k, top_p, rng.uniforms(keys, counters))
            counters += np.uint64(1)
            logits, states = model.step(nxt.astype(np.int32)[:, None], states)
            last = logits[:, -1, :]
        return time.perf_counter() - t0

    return run


def graph_runner(model: OnnxModel, graph: DecodeGraph) -> Runner:
    def run(batch: int, chars: int) -> float:
        temperature = np.ones(batch, np.float32)
        top_k, top_p = np.zeros(batch, np.int64), np.ones(batch, np.float32)
        keys, counters = rng.row_keys(np.arange(batch)), np.zeros(batch, np.uint64)
        states = primed(model, batch)
        ids = np.zeros(batch, np.int32)
        k = graph.steps
        t0 = time.perf_counter()
        for _ in range(chars // k):
            u = block_uniforms(keys, counters, k)  # (B, K)
            counters += np.uint64(k)
            out = graph.run(ids, states, temperature, top_k, top_p, u, details=False)
            ids, states = out.ids[:, -1], out.states
        return time.perf_counter() - t0

    return run


def prepare(cfg: Config, work: Path) -> tuple[dict[str, Runner], dict[str, Any]]:
    """Copy the model's graphs into `work`, add decode graphs for every K, open every variant."""
    from training.decode_artifact import add_decode_graphs

    meta = read_metadata(cfg.model)
    for name in ("model.json", *meta.graph_files()):
        shutil.copy2(cfg.model / name, work / name)
    variants: list[str | None] = [None] + [v.name for v in meta.variants if v.name == "int8"]
    runners: dict[str, Runner] = {}
    checks: dict[str, Any] = {}
    for variant in variants:
        label = variant or "fp32"
        model = load_model(work, OPTIONS, variant=variant)
        runners[f"{label} host"] = host_runner(model)
        for spec in add_decode_graphs(work, tuple(cfg.steps), variant):
            checks[spec.file] = spec.check
        for k in cfg.steps:
            graph = load_decode_graph(work, k, variant, OPTIONS)
            runners[f"{label} graph K={k}"] = graph_runner(model, graph)
    return runners, checks


def measure(cfg: Config, runners: dict[str, Runner]) -> list[dict[str, Any]]:
    rows = []
    for batch in cfg.batches:
        chars = cfg.chars[batch]
        for run in runners.values():  # warm-up: first calls allocate
            run(batch, min(chars, 16))
        seconds: dict[str, list[float]] = {name: [] for name in runners}
        for r in range(cfg.rounds):
            # Rotate the order each round, so no variant always runs right after another.
            names = list(runners)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                seconds[name].append(runners[name](batch, chars))
        base = seconds["fp32 host"]
        for name, s in seconds.items():
            rate = [batch * chars / x for x in s]
            rows.append({
                "variant": name, "batch": batch, "chars_per_round": chars,
                "rounds": cfg.rounds,
                "chars_per_s": round(statistics.median(rate), 1),
                "chars_per_s_best": round(max(rate), 1),
                "ratio_to_fp32_host": round(statistics.median(
                    [b / x for b, x in zip(base, s, strict=True)]), 3),
            })
            print(f"batch {batch:4d} {name:18s} {rows[-1]['chars_per_s']:>10,.0f} chars/s "
                  f"x{rows[-1]['ratio_to_fp32_host']:.2f}", file=sys.stderr, flush=True)
    return rows


def agreement(work: Path, rows: int) -> list[dict[str, Any]]:
    """K = 1 graph vs host sampler on `rows` x AGREEMENT_SEEDS random rows and parameters."""
    from training.decode_artifact import check_against_host

    meta = read_metadata(work)
    found = []
    for variant in [None, *(v.name for v in meta.variants if v.name == "int8")]:
        model = load_model(work, OPTIONS, variant=variant)
        graph = load_decode_graph(work, 1, variant, OPTIONS)
        total = {"rows": 0, "identical_rows": 0, "greedy_rows": 0, "greedy_identical": 0}
        for seed in range(AGREEMENT_SEEDS):
            check = check_against_host(graph, model, 1, rows=rows, seed=100 + seed)
            for key in total:
                total[key] += int(check[key])  # type: ignore[call-overload]
        found.append({"source": model.graph_file, **total,
                      "identical_fraction": total["identical_rows"] / total["rows"]})
    return found


def winners(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per batch size: the fastest variant, and the fastest K among the fp32 graphs."""
    best: dict[str, Any] = {}
    for batch in sorted({r["batch"] for r in rows}):
        at = [r for r in rows if r["batch"] == batch]
        top = max(at, key=lambda r: r["ratio_to_fp32_host"])
        graphs = [r for r in at if r["variant"].startswith("fp32 graph")]
        k = max(graphs, key=lambda r: r["ratio_to_fp32_host"]) if graphs else None
        best[str(batch)] = {"fastest": top["variant"], "ratio": top["ratio_to_fp32_host"],
                            "best_fp32_k": k["variant"].split("K=")[1] if k else None}
    return best


def markdown(report: dict[str, Any]) -> str:
    meta, s = report["meta"], report["settings"]
    batches = s["batches"]
    by = {(r["variant"], r["batch"]): r for r in report["results"]}
    variants = list(dict.fromkeys(r["variant"] for r in report["results"]))
    table = md_table(
        ["variant", *(f"B={b} chars/s" for b in batches), *(f"B={b} / fp32 host"
                                                            for b in batches)],
        [[v, *(by[v, b]["chars_per_s"] for b in batches),
          *(by[v, b]["ratio_to_fp32_host"] for b in batches)] for v in variants])
    win = md_table(["batch", "fastest variant", "ratio to fp32 host", "best K (fp32 graph)"],
                   [[b, w["fastest"], w["ratio"], w["best_fp32_k"]]
                    for b, w in report["winners"].items()])
    agree = md_table(["source graph", "rows", "identical", "greedy rows", "greedy identical"],
                     [[a["source"], a["rows"], a["identical_rows"], a["greedy_rows"],
                       a["greedy_identical"]] for a in report["agreement"]])
    return "\n".join([
        f"# Decode ceiling by variant: {Path(s['model']).name} on {meta['hostname']}, "
        f"{meta['started'][:10]}",
        "",
        f"{meta['cpu']}, {meta['cpu_count_logical']} logical CPUs; load average "
        f"{meta['loadavg_start']} at start, {meta['loadavg_end']} at end; onnxruntime "
        f"{meta['onnxruntime']}, CPU provider, 1 intra-op thread. Medians over {s['rounds']} "
        "interleaved rounds; ratios are per round against `fp32 host` (today's loop).",
        "", "## Throughput (decoded chars/s, all rows together)", "", table,
        "", "## Which wins", "", win,
        "", "## In-graph sampling vs the host sampler (K = 1, same uniforms)", "", agree, "",
    ])


def run(cfg: Config) -> dict[str, Any]:
    meta = {**machine_facts(), "loadavg_start": load_average()}
    with tempfile.TemporaryDirectory(prefix="ceiling-") as tmp:
        work = Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):  # progress to stderr, the report to stdout
            runners, checks = prepare(cfg, work)
        results = measure(cfg, runners)
        agree = agreement(work, cfg.agreement_rows)
    meta["loadavg_end"] = load_average()
    return {"meta": meta,
            "settings": {"model": shown(cfg.model), "batches": cfg.batches, "steps": cfg.steps,
                         "rounds": cfg.rounds, "chars_per_round": cfg.chars,
                         "temperature": 1.0, "intra_op_threads": OPTIONS.intra_op_threads},
            "results": results, "winners": winners(results), "agreement": agree,
            "decode_graph_checks": checks}






def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ceiling",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "shakespeare")
    p.add_argument("--batches", type=int_list, default="1,64,256", help="batch sizes")
    p.add_argument("--steps", type=int_list, default="1,4,8,16", help="K of the decode graphs")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per batch size")
    p.add_argument("--agreement-rows", type=int, default=20_000,
                   help=f"rows per seed ({AGREEMENT_SEEDS} seeds) for the agreement count")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--quick", action="store_true",
                   help="2 rounds, 16 chars, 500 agreement rows: a smoke test")
    args = p.parse_args(argv)
    if not (args.model / "model.json").is_file():
        raise SystemExit(f"{args.model}: not a model folder (no model.json)")
    cfg = Config(model=args.model, batches=args.batches, steps=args.steps,
                 rounds=2 if args.quick else args.rounds,
                 chars={b: chars_per_round(b, args.quick, args.steps) for b in args.batches},
                 agreement_rows=500 if args.quick else args.agreement_rows, out=args.out,
                 quick=args.quick)
    report = run(cfg)
    write_results(cfg.out, "ceiling", cfg.quick, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
