"""Scoring throughput and held-out bits per character, on the bundled models, in one run.

1. Characters scored per second through `POST /score` (`python -m app`, models/shakespeare):
   texts of ~2,000 held-out characters, 1 and 16 requests in flight; against the raw
   onnxruntime prefill of the same texts in this process (one graph call over whole texts,
   no log-softmax, no HTTP), measured in the same run.
2. lm-evaluation-harness 0.4.13 (`local-completions`, its remote tokenizer, batch size 4) on
   the last 10% of each bundled model's corpus (its validation split), cut at line ends into
   loglikelihood_rolling documents of about 2,000 characters (one request each; the newline
   before each is the primer lm-eval's prefix token stands for): the bits per character it
   reports, next to the figures in the model's model.json.

    .venv/bin/python -m bench.scoring            # ~2 minutes on 2 cores
    .venv/bin/python -m bench.scoring --quick    # smoke run (files get -quick)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import ROOT, load_average, machine_facts, md_table, start_service, write_results

DATA = Path(os.environ.get("CHARLSTM_DATA", ROOT.parent / "shared" / "data"))
CORPORA = {"shakespeare": "tinyshakespeare.txt", "nietzsche": "nietzsche.txt"}
DOC_CHARS = 2000  # lm-eval's rolling windows are 2,047 tokens: one window per document


def held_out(model: str) -> str:
    text = (DATA / CORPORA[model]).read_text(encoding="utf-8")
    return text[int(len(text) * 0.9):]  # training/data.py `split`


def start(model: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    return start_service({"default_model": model, "models_dir": str(ROOT / "models"),
                          "max_wait_s": "120"}, log)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def raw_prefill(texts: list[str], concurrency: int, repeats: int) -> float:
    """Characters per second of onnxruntime alone over whole texts, `concurrency` per call."""
    from app.runtime import load_model

    model = load_model(ROOT / "models" / "shakespeare")
    ids = np.stack([model.vocab.encode(t) for t in texts[:concurrency]])
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.step(ids, model.zero_states(len(ids)))
        best = min(best, time.perf_counter() - t0)
    return float(ids.size / best)


async def served_rate(url: str, texts: list[str], concurrency: int, rounds: int
                      ) -> dict[str, Any]:
    """Characters scored per second through /score with `concurrency` requests in flight."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def one(text: str) -> float:
            r = await client.post("/score", json={"text": text})
            r.raise_for_status()
            return float(r.json()["timings"]["total_ms"])

        await one(texts[0])  # warm
        t0 = time.perf_counter()
        totals: list[float] = []
        for i in range(rounds):
            batch = texts[i * concurrency % len(texts):][:concurrency]
            batch += texts[:concurrency - len(batch)]
            totals += await asyncio.gather(*(one(t) for t in batch))
        wall = time.perf_counter() - t0
    chars = rounds * concurrency * len(texts[0])
    return {"requests": len(totals), "chars": chars, "seconds": round(wall, 3),
            "chars_per_s": round(chars / wall, 1),
            "server_ms_p50": round(float(np.median(totals)), 1)}


def lm_eval_heldout(model: str, url: str, work: Path, limit_chars: int | None) -> dict[str, Any]:
    """lm-eval's loglikelihood_rolling over the held-out text, as `lm_eval` on the command
    line runs it (another process: its imports stay out of this one)."""
    text = held_out(model)[:limit_chars]
    docs = []
    while text:
        cut = text.find("\n", DOC_CHARS)
        doc, text = (text, "") if cut < 0 else (text[:cut], text[cut + 1:])
        if doc:
            docs.append(doc)
    data = work / f"{model}.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    chars = sum(map(len, docs))
    (work / f"heldout_{model}.yaml").write_text(
        f"task: heldout_{model}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n"
        "    higher_is_better: false\nmetadata:\n  version: 1.0\n", encoding="utf-8")
    primer = httpx.get(f"{url}/tokenizer_info", timeout=30).json()["primer_token_id"]
    out = work / f"out-{model}"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
           f"model={model},base_url={url}/v1/completions,tokenizer_backend=remote,"
           f"custom_prefix_token_id={primer}", "--batch_size", "4", "--include_path",
           str(work), "--tasks", f"heldout_{model}", "--output_path", str(out),
           "--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(work / "hf")}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                         check=False)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"lm_eval failed:\n{res.stderr[-3000:]}")
    samples = next(out.rglob(f"samples_heldout_{model}_*.jsonl"))
    # the samples file holds each response as its repr
    ll = math.fsum(float(json.loads(line)["filtered_resps"][0]) for line in samples.open())
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    meta = json.loads((ROOT / "models" / model / "model.json").read_text())
    measures = meta["validation"]["measures"]
    return {"chars": chars, "documents": len(docs), "loglikelihood_nats": round(ll, 3),
            "bits_per_char": round(-ll / chars / math.log(2), 4),
            "lm_eval_bits_per_byte": round(
                results["results"][f"heldout_{model}"]["bits_per_byte,none"], 4),
            "model_json_bits_per_char": {k: v["bits_per_char"] for k, v in measures.items()},
            "lm_eval_seconds": round(seconds, 1), "command": " ".join(cmd[2:])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=2000, help="characters per scored text")
    ap.add_argument("--levels", default="1,16", help="requests in flight")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of `level` requests")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    rounds = 1 if args.quick else args.rounds
    chars = 300 if args.quick else args.chars
    held = held_out("shakespeare")
    texts = [held[i * chars:(i + 1) * chars] for i in range(max(levels))]
    load_before = load_average()
    report: dict[str, Any] = {"machine": machine_facts(), "chars_per_text": chars,
                              "load_average": {"before": load_before}, "levels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        proc, url = start("shakespeare", work / "server.log")
        try:
            for level in levels:
                served = asyncio.run(served_rate(url, texts, level, rounds))
                raw = raw_prefill(texts, level, 3 if args.quick else 5)
                report["levels"][level] = {"served": served, "raw_prefill_chars_per_s":
                                           round(raw, 1)}
            heldout = {"shakespeare": lm_eval_heldout(
                "shakespeare", url, work, 3000 if args.quick else None)}
        finally:
            stop(proc)
        if not args.quick:
            proc, url = start("nietzsche", work / "server2.log")
            try:
                heldout["nietzsche"] = lm_eval_heldout("nietzsche", url, work, None)
            finally:
                stop(proc)
    report["heldout"] = heldout
    report["load_average"]["after"] = load_average()
    rows = [[lvl, v["served"]["chars_per_s"], v["raw_prefill_chars_per_s"],
             f"{v['served']['chars_per_s'] / v['raw_prefill_chars_per_s']:.0%}",
             v["served"]["server_ms_p50"]] for lvl, v in report["levels"].items()]
    hrows = [[m, h["chars"], h["bits_per_char"], h["lm_eval_bits_per_byte"],
              h["model_json_bits_per_char"].get("windows_256"),
              h["model_json_bits_per_char"].get("carried_state")] for m, h in heldout.items()]
    md = (f"# Scoring\n\n{report['machine']['cpu']}, {report['machine']['cpu_affinity']} "
          f"cores; load average before/after: {load_before} / "
          f"{report['load_average']['after']}.\n\n"
          f"## Characters scored per second (POST /score, texts of {chars} held-out "
          "characters; raw = one onnxruntime call over the whole texts, same run)\n\n"
          + md_table(["in flight", "served chars/s", "raw prefill chars/s", "served / raw",
                      "server ms p50"], rows)
          + "\n\n## lm-eval 0.4.13 on the held-out 10% (loglikelihood_rolling, documents of "
          f"~{DOC_CHARS:,} characters cut at line ends, each from a zero state primed with "
          "its newline)\n\n"
          + md_table(["model", "characters", "bits/char (lm-eval)", "lm-eval bits/byte",
                      "model.json windows of 256", "model.json state carried"], hrows)
          + "\n")
    write_results(args.out, "scoring", args.quick, report, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
