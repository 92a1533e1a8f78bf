"""Constrained decoding against free decoding, in one run, on the engine (no HTTP).

    python -m bench.constraints [--quick] [--model models/shakespeare] [--new-chars 200]

Each case submits S streams together to one EngineCore (the served decode graph, K =
CHARLSTM_DECODE_STEPS's default 8, as `python -m app` serves) and iterates until all finish;
characters per second = characters generated / wall time, the best of the runs (a shared
machine's neighbours only ever slow a run down) and the median. Cases, at S = 1 and S = 64:

    free         no constraint: the K-step decode graph samples in onnxruntime
    free, host   no constraint, host sampling (decode=None): what every row pays while a
                 constrained row shares its batch (the fallback below)
    regex        every stream constrained by REGEX (sentences over the model's alphabet):
                 host sampling with the DFA mask, one character per step
    mixed        (S = 64) one constrained stream and S - 1 free ones: the whole batch decodes
                 on the host while the constrained row is in it

Ratios are against `free` of the same S in the same run. Compile times of the regex and of the
generic JSON-object grammar (over a JSON-capable alphabet) are measured cold.
Writes <out>/constraints-<host>-<YYYYMMDD>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import string
import time
from pathlib import Path
from typing import Any

from app.constraints import ConstraintSpec, compile_constraint
from app.decode import DecodeGraphs, serving_decode_graphs
from app.engine.batch import Sequence
from app.engine.core import EngineCore
from app.engine.messages import Constraint, GenerationRequest, Sampling
from app.runtime import OnnxModel, RuntimeOptions, load_model
from bench.common import ROOT, load_average, machine_facts, write_results

REGEX = r"([A-Z][a-z]+( [a-z]+){0,12}[.!?] )+"
DECODE_STEPS = 8


def requests(model: OnnxModel, streams: int, new_chars: int,
             constraint: Constraint | None, constrained: int) -> list[GenerationRequest]:
    seed = model.vocab.encode("ROMEO:\n").tolist()
    return [GenerationRequest(seed_ids=seed, max_new=new_chars,
                              sampling=Sampling(temperature=1.0, seed=i),
                              constraint=constraint if i < constrained else None)
            for i in range(streams)]


def run_case(model: OnnxModel, decode: DecodeGraphs | None, reqs: list[GenerationRequest]
             ) -> tuple[float, int]:
    core = EngineCore(model, decode=decode, max_batch=256)
    seqs = [Sequence(r) for r in reqs]
    t0 = time.perf_counter()
    for s in seqs:
        core.submit(s)
    while core.has_work:
        core.iterate()
    seconds = time.perf_counter() - t0
    assert all(s.error is None for s in seqs), [s.error for s in seqs]
    return seconds, sum(len(s.ids) for s in seqs)


def compile_ms(kind: Any, value: Any, chars: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    c = compile_constraint(ConstraintSpec.of(kind, value), chars)
    return {"ms": round((time.perf_counter() - t0) * 1e3, 1), "states": c.states,
            "table_bytes": len(c.constraint.table)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "shakespeare")
    p.add_argument("--new-chars", type=int, default=400)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="50 characters, 1 repeat")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    new_chars, repeats = (50, 1) if args.quick else (args.new_chars, args.repeats)

    load_before = load_average()
    model = load_model(args.model, RuntimeOptions(device="cpu"))
    graphs = serving_decode_graphs(model, DECODE_STEPS)
    assert graphs is not None, f"{args.model} has no K = {DECODE_STEPS} decode graph"
    compiled = compile_constraint(ConstraintSpec.of("regex", REGEX), model.vocab.chars)
    json_chars = sorted(set(string.printable) - set("\x0b\x0c\r\t"))
    compiles = {"regex": compile_ms("regex", REGEX, model.vocab.chars),
                "json_object": compile_ms("json_object", None, json_chars)}

    rows: list[dict[str, Any]] = []
    for streams in (1, 64):
        cases: list[tuple[str, DecodeGraphs | None, int]] = [
            ("free", graphs, 0), ("free, host", None, 0), ("regex", graphs, streams)]
        if streams > 1:
            cases.append(("mixed", graphs, 1))
        run_case(model, graphs, requests(model, streams, 20, None, 0))  # warm-up
        rates: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        chars: dict[str, int] = {}
        # Round-robin over the cases, so a neighbour's load drifts over all of them alike.
        for _ in range(repeats):
            for name, decode, constrained in cases:
                reqs = requests(model, streams, new_chars, compiled.constraint, constrained)
                seconds, chars[name] = run_case(model, decode, reqs)
                rates[name].append(chars[name] / seconds)
        for name, _, constrained in cases:
            rows.append({"streams": streams, "case": name, "constrained": constrained,
                         "chars_per_s": round(max(rates[name]), 1),
                         "median_chars_per_s": round(statistics.median(rates[name]), 1),
                         "runs": [round(x, 1) for x in rates[name]], "chars": chars[name]})
    for r in rows:
        base = next(x for x in rows if x["streams"] == r["streams"] and x["case"] == "free")
        r["ratio_to_free"] = round(r["chars_per_s"] / base["chars_per_s"], 3)
        r["median_ratio_to_free"] = round(r["median_chars_per_s"] / base["median_chars_per_s"],
                                          3)

    report = {"bench": "constraints", "machine": machine_facts(),
              "load_average_before": load_before, "load_average_after": load_average(),
              "model": str(args.model),
              "regex": REGEX, "regex_states": compiled.states, "decode_steps": DECODE_STEPS,
              "new_chars": new_chars, "repeats": repeats, "compile": compiles, "rows": rows}
    lines = [f"# Constrained decoding ({args.model.name}, {new_chars} characters per stream, "
             f"best and median of {repeats} runs, interleaved)", "",
             f"Regex `{REGEX}` ({compiled.states} DFA states); decode graph K = {DECODE_STEPS}; "
             f"load average {load_before} before, "
             f"{report['load_average_after']} after.",
             "", "| streams | case | chars/s (best) | ratio to free | chars/s (median) | ratio |",
             "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['streams']} | {r['case']} | {r['chars_per_s']:,.0f} | "
              f"{r['ratio_to_free']:.2f} | {r['median_chars_per_s']:,.0f} | "
              f"{r['median_ratio_to_free']:.2f} |" for r in rows]
    lines += ["", "| compile (cold) | ms | DFA states | table bytes |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['ms']} | {v['states']} | {v['table_bytes']:,} |"
              for k, v in compiles.items()]
    write_results(args.out, "constraints", args.quick, report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
