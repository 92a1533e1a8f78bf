"""Fair shares per API key: one key floods a model with long requests; how soon do the other
keys' requests reach their first character, against the same request alone?

    .venv/bin/python -m bench.fairness            # ~2 minutes on 2 cores
    .venv/bin/python -m bench.fairness --quick    # smoke run (files get -quick)

`python -m app` on models/shakespeare (one HTTP worker, one engine process), run twice: with
ten API keys (fair queuing per key, app/engine/fairness.py), then without keys (one FIFO, as
before keys had shares). Scenarios, one after another on the same machine:

- alone: a victim key's requests (a 40-character seed, 50 new characters, streamed), one
  after another, nothing else running;
- 2 keys: the same while the flood key keeps N long requests (max_new_chars 2000) in flight
  (each sent again as soon as it ends, after Retry-After when refused);
- 10 keys: nine victim keys at once, each one request after another, during the flood;
- no keys: the 2-key scenario on the server without keys (everyone in one FIFO).

Time to first character is the server's (`first_char_ms`: submission to first character);
"slices" divides it by the engine's decode period during that scenario (decode calls counted
from /metrics), the unit of the fairness promise. Refused requests (429) are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    ROOT,
    latency_ms,
    load_average,
    machine_facts,
    md_table,
    start_service,
    write_results,
)

VICTIM_SEED = "Now is the winter of our discontent made g"[:40]
FLOOD_SEED = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


def start(models: Path, model: str, keys: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    return start_service({"default_model": model, "models_dir": str(models), "api_keys": keys,
                          "http_workers": "1", "watch_models": "false", "max_queue": "1000"}, log)


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def decode_calls(c: httpx.AsyncClient) -> float:
    text = (await c.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("charlstm_batch_size_count"))


async def victim(c: httpx.AsyncClient, key: str | None, n: int,
                 out: dict[str, list[float]]) -> None:
    """n requests one after another: the server's first_char_ms of each, or a refusal."""
    for _ in range(n):
        body = {"seed_text": VICTIM_SEED, "max_new_chars": 50, "stream": True}
        async with c.stream("POST", "/generate", json=body, headers=auth(key)) as r:
            if r.status_code == 429:
                out["refused"].append(float(r.headers.get("Retry-After", 0)))
                await r.aread()
                await asyncio.sleep(0.2)
                continue
            event = ""
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "done":
                    out["ttfc"].append(json.loads(line[5:])["timings"]["first_char_ms"] / 1e3)


async def scenario(url: str, model: str, flood_key: str | None, victims: list[str | None],
                   flood: int, per_victim: int, flood_chars: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=flood + len(victims) + 10,
                          max_keepalive_connections=flood + len(victims) + 10)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        flooding: list[asyncio.Task[Any]] = []
        refused_flood = 0
        if flood:
            async def one() -> None:  # one request in flight, again and again
                nonlocal refused_flood
                while True:
                    r = await c.post("/generate", headers=auth(flood_key), json={
                        "seed_text": FLOOD_SEED, "max_new_chars": flood_chars})
                    if r.status_code == 429:
                        refused_flood += 1
                        await asyncio.sleep(float(r.headers.get("Retry-After", 1)))

            flooding = [asyncio.ensure_future(one()) for _ in range(flood)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # every flood request admitted or refused
                m = (await c.get(f"/models/{model}", headers=auth(flood_key))).json()
                if m["waiting"] + m["active_rows"] >= flood or refused_flood:
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)
        out: dict[str, list[float]] = {"ttfc": [], "refused": []}
        calls0, t0 = await decode_calls(c), time.perf_counter()
        await asyncio.gather(*(victim(c, k, per_victim, out) for k in victims))
        elapsed = time.perf_counter() - t0
        calls = await decode_calls(c) - calls0
        status = (await c.get(f"/models/{model}", headers=auth(flood_key))).json()
        for t in flooding:
            t.cancel()
        await asyncio.gather(*flooding, return_exceptions=True)
    period = elapsed / calls if calls else None
    return {"victims": len(victims), "flood": flood, "flood_refused": refused_flood,
            "waiting_at_end": status["waiting"], "rows_at_end": status["active_rows"],
            "decode_period_ms": round(period * 1e3, 3) if period else None,
            "ttfc_ms": latency_ms(out["ttfc"]), "ttfc_s": out["ttfc"],
            "victim_refused": len(out["refused"])}


async def settle(url: str, model: str, key: str | None) -> None:
    """Until the engine has let go of the cancelled flood."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        for _ in range(300):
            m = (await c.get(f"/models/{model}", headers=auth(key))).json()
            if m["waiting"] == 0 and m["active_rows"] == 0:
                return
            await asyncio.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=ROOT / "models")
    ap.add_argument("--model", default="shakespeare")
    ap.add_argument("--flood", type=int, default=300, help="long requests of the flood key")
    ap.add_argument("--flood-chars", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=8, help="per victim key")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    flood, per = (40, 3) if args.quick else (args.flood, args.requests)
    keys = ["flood-secret;name=flood", *(f"victim{i}-secret;name=victim{i}" for i in range(9))]
    victims: list[str | None] = [f"victim{i}-secret" for i in range(9)]
    load_before = load_average()
    results: dict[str, Any] = {}
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start(args.models_dir, args.model, ",".join(keys), Path(tmp) / "keys.log")
        try:
            m = args.model
            results["alone"] = asyncio.run(scenario(url, m, "flood-secret", [victims[0]], 0,
                                                    per, 0))
            results["2 keys"] = asyncio.run(scenario(url, m, "flood-secret", [victims[0]],
                                                     flood, per, args.flood_chars))
            asyncio.run(settle(url, m, "flood-secret"))
            results["10 keys"] = asyncio.run(scenario(url, m, "flood-secret", list(victims),
                                                      flood, per, args.flood_chars))
        finally:
            proc.terminate()
            proc.wait(60)
        proc, url = start(args.models_dir, args.model, "", Path(tmp) / "nokeys.log")
        try:
            results["no keys (one FIFO)"] = asyncio.run(
                scenario(url, args.model, None, [None], flood, per, args.flood_chars))
        finally:
            proc.terminate()
            proc.wait(60)
    alone = results["alone"]["ttfc_ms"]["p50"]
    rows = []
    for name, r in results.items():
        t = r["ttfc_ms"]
        period = r["decode_period_ms"]
        rows.append([name, r["victims"], r["flood"], t["n"], t["p50"], t["p90"], t["max"],
                     round(t["p50"] / alone, 1) if t["p50"] and alone else None,
                     round(t["max"] / period, 1) if t["max"] and period else None,
                     period, r["victim_refused"], r["flood_refused"]])
    report: dict[str, Any] = {
        "bench": "fairness", "model": args.model, "flood": flood,
        "flood_chars": args.flood_chars, "requests_per_victim": per, "scenarios": results,
        "seconds": round(time.monotonic() - began, 1), "machine": machine_facts(),
        "load_average": {"before": load_before, "after": load_average()},
    }
    md = (f"# Fair shares per API key: a victim's first character under a flood\n\n"
          f"`python -m bench.fairness{' --quick' if args.quick else ''}`, models/{args.model}, "
          f"`python -m app` (1 HTTP worker) on this machine. The flood key keeps {flood} "
          f"requests of {args.flood_chars} characters in flight (each sent again when it "
          f"ends; after Retry-After when refused: `flood 429s`); each victim key sends "
          f"{per} streamed requests (40-character seed, 50 new characters) one after another. "
          f"Time to first character as the server measures it (submission to first "
          f"character), in ms; `x alone` is the p50 over the p50 alone; `max slices` the "
          f"slowest victim request in decode periods of that scenario (decode calls counted "
          f"in /metrics). {report['seconds']} s in all; load average before/after: "
          f"{load_before} / {report['load_average']['after']}.\n\n"
          + md_table(["scenario", "victim keys", "flood", "n", "p50 ms", "p90 ms", "max ms",
                      "x alone", "max slices", "decode period ms", "victim 429s",
                      "flood 429s"], rows) + "\n")
    write_results(args.out, "fairness", args.quick, report, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
