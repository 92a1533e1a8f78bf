"""The exact state cache's win: a long seed sent again, time to first character with and
without the cache, on models/shakespeare through `python -m app` (same run, interleaved).

    .venv/bin/python -m bench.state_cache            # ~1 minute on 2 cores
    .venv/bin/python -m bench.state_cache --quick    # smoke run (files get -quick)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

from bench.common import (
    ROOT,
    latency_ms,
    load_average,
    machine_facts,
    md_table,
    start_service,
    write_results,
)


def start(cache_mb: float, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    return start_service({"default_model": "shakespeare", "models_dir": str(ROOT / "models"),
                          "state_cache_mb": str(cache_mb)}, log)


def first_char_s(client: httpx.Client, seed_text: str) -> tuple[float, float]:
    """(client-side s from sending to the first character, the server's first_char_ms / 1e3)."""
    t0 = time.perf_counter()
    client_s = None
    with connect_sse(client, "POST", "/generate", json={
            "seed_text": seed_text, "max_new_chars": 20, "stream": True, "seed": 1}) as es:
        for ev in es.iter_sse():
            if ev.event == "message" and client_s is None:
                client_s = time.perf_counter() - t0
            elif ev.event == "done" and client_s is not None:
                return client_s, ev.json()["timings"]["first_char_ms"] / 1e3
    raise RuntimeError("no character came back")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed-chars", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    text = (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    corpus = text.read_text(encoding="utf-8") if text.is_file() else "To be, or not to be. " * 200
    seed = corpus[10_000:10_000 + args.seed_chars]
    load_before = load_average()
    names = ("without cache", "with cache (seed seen before)")
    times: dict[str, list[float]] = {n: [] for n in names}
    server: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        off, url_off = start(0, Path(tmp) / "off.log")
        on, url_on = start(64, Path(tmp) / "on.log")
        try:
            with httpx.Client(base_url=url_off, timeout=60) as c_off, \
                    httpx.Client(base_url=url_on, timeout=60) as c_on:
                first_char_s(c_on, seed)  # the first send fills the cache
                first_char_s(c_off, seed)
                for _ in range(repeats):  # interleaved: both see the same machine
                    for name, c in zip(names, (c_off, c_on), strict=True):
                        client_s, server_s = first_char_s(c, seed)
                        times[name].append(client_s)
                        server[name].append(server_s)
            metrics = httpx.get(f"{url_on}/metrics", timeout=10).text
        finally:
            for p in (off, on):
                p.terminate()
                p.wait(60)
    hits = [ln for ln in metrics.splitlines() if ln.startswith("charlstm_state_cache_lookups")]
    summary = {name: latency_ms(v) for name, v in times.items()}
    server_summary = {name: latency_ms(v) for name, v in server.items()}
    speedup = statistics.median(server[names[0]]) / statistics.median(server[names[1]])
    report: dict[str, Any] = {
        "bench": "state_cache", "seed_chars": args.seed_chars, "repeats": repeats,
        "model": "shakespeare", "ttfc_ms_client": summary,
        "first_char_ms_server": server_summary, "median_speedup_server": round(speedup, 2),
        "cache_metrics": hits, "machine": machine_facts(),
        "load_average": {"before": load_before, "after": load_average()},
    }
    rows = [[name, server_summary[name]["p50"], server_summary[name]["p90"],
             summary[name]["p50"], summary[name]["p90"]] for name in names]
    md = (f"# State cache: a {args.seed_chars}-character seed sent again\n\n"
          f"`python -m bench.state_cache`, models/shakespeare, `python -m app` on this "
          f"machine, {repeats} interleaved requests each: time to the first character as the "
          f"server measures it (`first_char_ms`: submission to first character) and as the "
          f"client sees it (request sent to first event, one kept-alive connection). Load "
          f"average before/after: {load_before} / {report['load_average']['after']}.\n\n"
          + md_table(["", "server p50 ms", "server p90 ms", "client p50 ms", "client p90 ms"],
                     rows)
          + f"\n\nMedian speed-up (server): {speedup:.1f}x. Cache counters at the end: "
          + ", ".join(f"`{h}`" for h in hits) + "\n")
    write_results(args.out, "state-cache", args.quick, report, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
