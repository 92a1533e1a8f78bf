"""Serving ceiling: what `python -m app` delivers over HTTP against the raw decode loop of the
same model, for today's service (supervisor + engine process + HTTP workers) and for the one
before it (--before-ref: b6ca3ca, before the request path became one request type, one event
stream and one engine client), in one run.

    python -m bench.serving [--quick] [--before-dir DIR] [--levels 1,64,256,1024] ...

Two models:

    free   1 x LSTM(8), trained for one epoch and exported with the project's own CLI into a
           temporary folder: a step costs next to nothing, so what is left is the serving path
    real   models/shakespeare (2 x LSTM(256)): the service as users see it

Each level drives a server with h2load (HTTP/1.1: N connections, each streaming POST /generate
requests one after the other) and, right before and after it, the raw loop in this process
(onnxruntime session + app.rng.uniforms + app.sampling.sample_next, batch N, carried state).

Writes <out>/serving-<host>-<YYYYMMDD>.{json,md} and prints the Markdown report.
bench/README.md says what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from app.artifact import read_metadata
from app.runtime import OnnxModel, RuntimeOptions, load_model, serving_variant
from bench.common import (
    ROOT,
    cell,
    int_list,
    load_average,
    machine_facts,
    md_table,
    shown,
    write_results,
)
from bench.decode import free_port, parse_metrics, raise_open_files_limit, raw_round

BEFORE_REF = "b6ca3ca"  # before the request path was made one type, one stream, one client
DEFAULTS: dict[str, Any] = {
    "levels": "1,64,256,1024", "real_levels": "1,64,256", "free_chars": 1000,
    "real_chars": 300, "target_s": 10.0, "raw_s": 1.0, "profile_s": 6.0,
}
QUICK: dict[str, Any] = {
    "levels": "1,4", "real_levels": "1,4", "free_chars": 40, "real_chars": 20,
    "target_s": 0.3, "raw_s": 0.05, "profile_s": 1.0,
}
SEED_TEXT = "A"
TEMPERATURE = 1.0
FREE_CORPUS_CHARS = 50_000
CAPACITY = 1024  # CHARLSTM_MAX_BATCH: every level's streams fit in one batch
PILOT_FRACTION = 5  # the pilot (also the warm-up) streams chars / 5 per request
PASSES = 2  # per level: servers in turn, then in reverse order
MAX_REQUESTS_PER_CONNECTION = 400
H2LOAD_TIMEOUT_S = 900
SERVER_ENV = {
    "CHARLSTM_MAX_BATCH": str(CAPACITY), "CHARLSTM_MAX_QUEUE": "100000",
    "CHARLSTM_MAX_WAIT_S": "100000", "CHARLSTM_MAX_CONNECTIONS": "4096",
    "CHARLSTM_TIME_LIMIT_S": "100000", "CHARLSTM_DEVICE": "cpu",
    "CHARLSTM_INTRA_OP_THREADS": "1", "CHARLSTM_LOG_LEVEL": "warning",
    "CHARLSTM_API_KEYS": "", "CHARLSTM_DRAIN_S": "1", "CHARLSTM_HOST": "127.0.0.1",
}
# Targets from the issue: (model, level, minimum service / raw). Level 1 is the single stream.
# Issue 18's: the free model's service against its raw loop (the real model's bar there is
# "no slower than before", read off the before/after rows).
TARGETS: list[tuple[str, int, float]] = [
    ("free", 1, 0.9), ("free", 256, 0.6), ("free", 1024, 0.4),
]


@dataclass(frozen=True)
class Config:
    levels: list[int]
    real_levels: list[int]
    free_chars: int
    real_chars: int
    target_s: float  # seconds of h2load per level and server (about)
    raw_s: float  # each raw slice: repeat rounds until this many seconds (one at least)
    profile_s: float
    real_model: Path
    free_model: Path | None  # an exported free model to reuse instead of building one
    corpus: Path
    before_ref: str
    before_dir: Path | None
    before: bool
    profile: bool
    servers: list[str] | None  # only these server keys (None: every one)
    out: Path
    quick: bool
    h2load: str


STARTED = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {msg}", file=sys.stderr, flush=True)


# --- the free model -------------------------------------------------------------------------
def run_checked(args: list[str], what: str, timeout: float = 600) -> None:
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed ({res.returncode}):\n{res.stderr[-3000:]}")


def build_free_model(workdir: Path, corpus: Path, chars: int = FREE_CORPUS_CHARS) -> Path:
    """Train 1 x LSTM(8) for one epoch on the first `chars` characters of `corpus` and export
    it as `free`, with `python -m training` as a user would; returns the model folder."""
    workdir.mkdir(parents=True, exist_ok=True)
    text = workdir / "corpus.txt"
    text.write_text(corpus.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    run = workdir / "run"
    python = sys.executable
    run_checked([python, "-m", "training", "train", str(text), "-o", str(run), "--units", "8",
                 "--layers", "1", "--embedding-dim", "8", "--epochs", "1", "--sample-length",
                 "20", "--quiet"], "training the free model")
    models = workdir / "models"
    run_checked([python, "-m", "training", "export", str(run), "--name", "free",
                 "--models-dir", str(models)], "exporting the free model")
    return models / "free"


# --- the raw loop ---------------------------------------------------------------------------
@dataclass
class RawResult:
    graph: str  # the graph file run: model.onnx or a variant's
    batch: int
    chars: int  # per row and round
    rounds: int
    wall_s: float
    chars_per_s: float
    step_ms: float  # onnxruntime per step of the whole batch
    sample_ms: float  # rng.uniforms + sample_next per step of the whole batch
    cpu_us_per_char: float  # this process's CPU time per generated character


def measure_raw(model: OnnxModel, batch: int, chars: int, min_s: float) -> RawResult:
    """Batch rows, each a request's work: prefill the seed, then `chars` characters sampled
    (temperature 1) and fed back with the carried state, as bench.decode's raw level."""
    seed = model.vocab.encode(SEED_TEXT).astype(np.int32)
    seed_ids = np.tile(seed, (batch, 1))
    raw_round(model, seed_ids, min(8, chars))  # warm-up: allocations at this batch size
    totals = np.zeros(4)
    rounds = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    while rounds == 0 or time.perf_counter() - t0 < min_s:
        totals += raw_round(model, seed_ids, chars)
        rounds += 1
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    _, step_s, sample_s, steps = (float(x) for x in totals)
    generated = rounds * batch * chars
    return RawResult(graph=model.graph_file, batch=batch, chars=chars, rounds=rounds,
                     wall_s=round(wall, 4), chars_per_s=round(generated / wall, 1),
                     step_ms=round(step_s / max(steps, 1) * 1e3, 4),
                     sample_ms=round(sample_s / (rounds * chars) * 1e3, 4),
                     cpu_us_per_char=round(cpu / generated * 1e6, 3))


def raw_slice(cfg: Config, models: dict[str | None, OnnxModel], batch: int, chars: int
              ) -> dict[str | None, RawResult]:
    return {v: measure_raw(m, batch, chars, cfg.raw_s) for v, m in models.items()}


# --- servers --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerSpec:
    key: str  # after | after_w2 | after_host | after_fp32 | after_int8 | before
    label: str
    code: Path  # the checkout whose `python -m app` runs
    env: dict[str, str]
    variant: str | None  # the graph it should serve (None: model.onnx), for its raw baseline


@dataclass
class Server:
    spec: ServerSpec
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int
    roles: dict[int, str] = field(default_factory=dict)  # pid -> role, once ready
    graph: str = "model.onnx"
    decode_graph: str | None = None  # sampling in the graph, K per call (/models)
    log_offset: int = 0

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def cpu_by_pid(self) -> dict[int, float]:
        """utime + stime of every process of the server now, in seconds."""
        out = {}
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
        return out

    def find_roles(self) -> None:
        """supervisor (the root), HTTP workers (the children listening on the port), the
        multiprocessing resource tracker, engines (the rest); one process before 7686f26."""
        procs = self.tree()
        if len(procs) == 1:
            self.roles = {procs[0].pid: "server"}
            return
        roles = {procs[0].pid: "supervisor"}
        for p in procs[1:]:
            try:
                if any("resource_tracker" in part for part in p.cmdline()):
                    roles[p.pid] = "tracker"
                elif any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr[1] == self.port
                         for c in p.net_connections(kind="tcp")):
                    roles[p.pid] = "http worker"
                else:
                    roles[p.pid] = "engine"
            except psutil.Error:
                continue
        self.roles = roles

    def metrics_text(self) -> str:
        r = httpx.get(f"{self.url}/metrics", timeout=30, trust_env=False)
        r.raise_for_status()
        return r.text

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.metrics_text())

    def new_errors(self) -> list[str]:
        """ERROR lines the server logged since the last call."""
        with self.log_path.open("rb") as f:
            f.seek(self.log_offset)
            text = f.read().decode(errors="replace")
            self.log_offset = f.tell()
        return [line.strip() for line in text.splitlines() if " ERROR " in line]


def start_server(spec: ServerSpec, models_dir: Path, default_model: str, workdir: Path
                 ) -> Server:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **SERVER_ENV,
           "CHARLSTM_MODELS_DIR": str(models_dir), "CHARLSTM_DEFAULT_MODEL": default_model,
           "CHARLSTM_PORT": str(port), **spec.env}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the supervisor sets its own
    log_path = workdir / f"server-{default_model}-{spec.key}.log"
    with log_path.open("wb") as out:
        # cwd = the checkout: `-m app` imports that checkout's code first.
        proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=spec.code, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    return Server(spec, f"http://127.0.0.1:{port}", proc, log_path, port)


def wait_ready(server: Server, model: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.spec.label}: server exited with "
                               f"{server.proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/ready", timeout=2, trust_env=False).status_code == 200:
                info = httpx.get(f"{server.url}/models/{model}", timeout=5,
                                 trust_env=False).json()
                server.graph = str(info.get("graph") or "model.onnx")
                server.decode_graph = info.get("decode_graph")
                server.find_roles()
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.spec.label}: not ready after {timeout_s:.0f} s:\n"
                       f"{server.log_tail()}")


def stop_server(server: Server) -> None:
    procs = server.tree()
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(40)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
    for p in procs[1:]:  # children the supervisor did not reap in time: ours, by pid
        with contextlib.suppress(psutil.Error):
            if p.is_running():
                p.kill()


@contextlib.contextmanager
def servers(specs: list[ServerSpec], models_dir: Path, model: str, workdir: Path
            ) -> Iterator[list[Server]]:
    """Every server of a section at once (idle ones cost next to nothing), so the levels can
    interleave them."""
    started: list[Server] = []
    try:
        for spec in specs:
            started.append(start_server(spec, models_dir, model, workdir))
        for s in started:
            wait_ready(s, model)
            workers = sum(r == "http worker" for r in s.roles.values())
            log(f"{s.spec.label}: ready at {s.url}, serving {s.graph}, "
                f"{len(s.roles)} process(es)" + (f", {workers} HTTP worker(s)" if workers
                                                 else ""))
        yield started
    finally:
        for s in started:
            stop_server(s)


def check_serves(url: str, chars: int) -> dict[str, Any]:
    """One streaming request read to its `done` event: the characters and the summary."""
    got = 0
    summary: dict[str, Any] = {}
    body = {"seed_text": SEED_TEXT, "max_new_chars": chars, "stream": True,
            "temperature": TEMPERATURE}
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=60,
                      trust_env=False) as r:
        r.raise_for_status()
        event = "message"
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1])
                if event == "message":
                    got += len(data["text"])
                elif event == "done":
                    summary = data
            elif not line:
                event = "message"
    return {"chars": got, "finish_reason": summary.get("finish_reason"),
            "generated_chars": summary.get("usage", {}).get("generated_chars")}


# --- h2load ---------------------------------------------------------------------------------
@dataclass
class H2Load:
    requests: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    finished_s: float  # h2load's own wall time for the requests
    ttfb_ms: dict[str, float]  # "time to 1st byte": min, max, mean, sd over connections
    request_ms: dict[str, float]  # "time for request": min, max, mean, sd over requests
    cpu_s: float  # h2load's own user + system CPU time
    wall_s: float  # the process, start to exit


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def parse_h2load(text: str) -> dict[str, Any]:
    def stats(label: str) -> dict[str, float]:
        m = re.search(rf"{label}:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", text)
        if not m:
            return {}
        return {k: round(_ms(v), 3) for k, v in zip(("min", "max", "mean", "sd"), m.groups(),
                                                    strict=True)}

    fin = re.search(r"finished in ([\d.]+)(us|ms|s),", text)
    req = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, "
                    r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    codes = re.search(r"status codes: (\d+) 2xx", text)
    if not (fin and req and codes):
        raise RuntimeError(f"cannot read h2load's output:\n{text[-2000:]}")
    return {
        "requests": int(req.group(1)), "succeeded": int(req.group(2)),
        "failed": int(req.group(3)), "errored": int(req.group(4)), "timeout": int(req.group(5)),
        "status_2xx": int(codes.group(1)),
        "finished_s": round(_ms(fin.group(1) + fin.group(2)) / 1e3, 4),
        "ttfb_ms": stats("time to 1st byte"), "request_ms": stats("time for request"),
    }


def length_finishes(text: str) -> float:
    """Requests the server finished with finish_reason "length" (complete), from /metrics."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("charlstm_requests_total{") and 'outcome="length"' in line:
            with contextlib.suppress(ValueError):
                total += float(line.rpartition(" ")[2])
    return total


def h2load_args(cfg: Config, url: str, body: Path, clients: int, requests: int) -> list[str]:
    return [cfg.h2load, "--h1", "-t", "1", "-c", str(clients), "-n", str(requests), "-d",
            str(body), "-H", "content-type: application/json", f"{url}/generate"]


def run_h2load(cfg: Config, url: str, body: Path, clients: int, requests: int) -> H2Load:
    """h2load to completion; its CPU time from the kernel's accounting of reaped children
    (no other child of this process ends while it runs)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(h2load_args(cfg, url, body, clients, requests), capture_output=True,
                         text=True, timeout=H2LOAD_TIMEOUT_S, check=False)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(f"h2load failed ({res.returncode}):\n{res.stdout[-2000:]}"
                           f"{res.stderr[-2000:]}")
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return H2Load(**parse_h2load(res.stdout), cpu_s=round(cpu, 3), wall_s=round(wall, 3))


# --- one level ------------------------------------------------------------------------------
@dataclass
class Sample:
    """One h2load run against one server: the additive quantities a level sums over passes."""

    requests: int
    ok: int
    wall_s: float  # h2load's "finished in"
    h2load_wall_s: float  # the h2load process, start to exit
    loadgen_cpu_s: float
    own_cpu_s: float  # this process meanwhile
    machine_busy_s: float  # every CPU on the machine, from /proc/stat
    cpu_by_role: dict[str, float]
    server_chars: float
    ttft_sum_s: float
    ttft_count: float
    batch_sum: float
    steps: float
    ttfb_mean_ms: float
    ttfb_max_ms: float
    complete: float  # requests the server finished with "length" during the run
    errors: list[str]  # ERROR lines in the server's log during the run


@dataclass
class LevelResult:
    model: str  # free | real
    server: str  # ServerSpec.key
    label: str
    graph: str
    level: int  # concurrent streams (h2load connections)
    chars: int  # per request
    passes: int  # h2load runs summed (servers interleaved ABC, CBA)
    requests: int
    succeeded: int  # complete streams: 2xx for h2load, finished "length" for the server
    failed: int  # requests - succeeded (h2load's failed, errored, timeout, non-2xx, and 2xx
    # streams the server ended early, e.g. with an error event)
    server_errors: list[str]  # ERROR lines of the server's log during the runs (first 5)
    wall_s: float  # h2load's "finished in", summed over passes
    chars_per_s: float  # succeeded x chars / wall
    server_chars: int  # generated characters the server counted (/metrics) in the level
    server_cpu_s: float  # user + system of every process of the server, during the level
    server_cores: float  # server_cpu_s / wall
    cpu_us_per_char: float | None
    cpu_us_per_char_by_role: dict[str, float]
    ttfb_ms: dict[str, float]  # h2load: connection start -> first byte (mean of passes, max)
    server_ttft_ms: float | None  # /metrics: submission -> first character, mean of requests
    mean_batch: float | None  # /metrics: rows per decode step
    steps: int
    loadgen_cpu_s: float
    loadgen_core_share: float  # h2load CPU / wall: the share of one core it used
    machine_busy_cores: float  # every process on the machine, from /proc/stat
    other_cores: float  # machine busy - server - h2load - this process: neighbours
    raw_chars_per_s: float | None = None  # the raw slices right before and after its runs
    ratio: float | None = None  # chars_per_s / raw_chars_per_s
    raw_cpu_us_per_char: float | None = None  # the same slices' CPU per character
    cpu_ratio: float | None = None  # raw CPU per char / server CPU per char (1 = as lean)


def requests_for(cfg: Config, server: Server, body: Path, n: int, seconds: float) -> int:
    """Warm-up and pilot in one: one request per connection at chars / PILOT_FRACTION; the
    measured run gets enough requests per connection for about `seconds`."""
    pilot = run_h2load(cfg, server.url, body, n, n)
    if pilot.succeeded < n:
        raise RuntimeError(f"{server.spec.label}: pilot at {n} streams: {pilot}\n"
                           f"{server.log_tail()}")
    per_request_s = pilot.finished_s * PILOT_FRACTION  # one wave of full-length requests
    k = int(np.clip(round(seconds / max(per_request_s, 1e-6)), 1, MAX_REQUESTS_PER_CONNECTION))
    return k * n


def sample_level(cfg: Config, server: Server, n: int, body: Path, pilot_body: Path,
                 seconds: float) -> Sample:
    requests = requests_for(cfg, server, pilot_body, n, seconds)
    server.new_errors()  # the pilot's, if any, are not this run's
    t0 = server.metrics_text()
    m0 = parse_metrics(t0)
    cpu0 = server.cpu_by_pid()
    mach0 = psutil.cpu_times()
    own0 = time.process_time()
    h2 = run_h2load(cfg, server.url, body, n, requests)
    own = time.process_time() - own0
    mach1 = psutil.cpu_times()
    cpu1 = server.cpu_by_pid()
    t1 = server.metrics_text()
    m1 = parse_metrics(t1)

    def delta(key: str) -> float:
        return m1.get(key, 0.0) - m0.get(key, 0.0)

    by_role: dict[str, float] = {}
    for pid, t in cpu1.items():
        role = server.roles.get(pid, "other")
        by_role[role] = by_role.get(role, 0.0) + t - cpu0.get(pid, 0.0)
    busy = sum(getattr(mach1, f) - getattr(mach0, f)
               for f in ("user", "nice", "system", "irq", "softirq", "steal"))
    return Sample(
        requests=h2.requests, ok=min(h2.succeeded, h2.status_2xx), wall_s=h2.finished_s,
        h2load_wall_s=h2.wall_s, loadgen_cpu_s=h2.cpu_s, own_cpu_s=own, machine_busy_s=busy,
        cpu_by_role=by_role, server_chars=delta("charlstm_generated_chars_total"),
        ttft_sum_s=delta("charlstm_time_to_first_char_seconds_sum"),
        ttft_count=delta("charlstm_time_to_first_char_seconds_count"),
        batch_sum=delta("charlstm_batch_size_sum"), steps=delta("charlstm_batch_size_count"),
        ttfb_mean_ms=h2.ttfb_ms.get("mean", float("nan")),
        ttfb_max_ms=h2.ttfb_ms.get("max", float("nan")),
        complete=length_finishes(t1) - length_finishes(t0), errors=server.new_errors(),
    )


def level_result(model: str, server: Server, n: int, chars: int, samples: list[Sample]
                 ) -> LevelResult:
    def total(name: str) -> float:
        return float(sum(getattr(s, name) for s in samples))

    wall, h2_wall = total("wall_s"), total("h2load_wall_s")
    # A 200 whose stream ended early (an error event) is a success to h2load, not to the
    # server's own count of requests finished at full length.
    ok = int(min(total("ok"), total("complete")))
    errors = [e for smp in samples for e in smp.errors]
    delivered = ok * chars
    by_role: dict[str, float] = {}
    for s in samples:
        for role, t in s.cpu_by_role.items():
            by_role[role] = by_role.get(role, 0.0) + t
    server_cpu = float(sum(by_role.values()))
    steps, firsts = total("steps"), total("ttft_count")
    loadgen = total("loadgen_cpu_s")
    return LevelResult(
        model=model, server=server.spec.key, label=server.spec.label,
        graph=server.graph + (f" + {server.decode_graph}" if server.decode_graph else ""),
        level=n, chars=chars, passes=len(samples), requests=int(total("requests")),
        succeeded=ok, failed=int(total("requests")) - ok,
        server_errors=errors[:5] + ([f"... {len(errors) - 5} more"] if len(errors) > 5 else []),
        wall_s=round(wall, 4),
        chars_per_s=round(delivered / wall, 1), server_chars=int(total("server_chars")),
        server_cpu_s=round(server_cpu, 3), server_cores=round(server_cpu / wall, 3),
        cpu_us_per_char=round(server_cpu / delivered * 1e6, 3) if delivered else None,
        cpu_us_per_char_by_role={r: round(t / delivered * 1e6, 3) if delivered else 0.0
                                 for r, t in sorted(by_role.items())},
        ttfb_ms={"mean": round(float(np.mean([s.ttfb_mean_ms for s in samples])), 3),
                 "max": round(max(s.ttfb_max_ms for s in samples), 3)},
        server_ttft_ms=round(total("ttft_sum_s") / firsts * 1e3, 3) if firsts else None,
        mean_batch=round(total("batch_sum") / steps, 2) if steps else None,
        steps=int(steps), loadgen_cpu_s=round(loadgen, 3),
        loadgen_core_share=round(loadgen / h2_wall, 3),
        machine_busy_cores=round(total("machine_busy_s") / h2_wall, 3),
        other_cores=round(max(total("machine_busy_s") - server_cpu - loadgen
                              - total("own_cpu_s"), 0.0) / h2_wall, 3),
    )


def wait_idle(server: Server, timeout_s: float = 60) -> None:
    """Until the server holds no rows and no queue (after a profile's load was stopped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = server.metrics()
        if m.get("charlstm_active_rows", 0.0) + m.get("charlstm_queue_depth", 0.0) == 0:
            return
        time.sleep(0.2)


# --- profiles -------------------------------------------------------------------------------
def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def summarise_profile(text: str, rate: int, seconds: float, top: int = 8) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks -> busy share, the frames on top of the stack (self
    time: for native code, the Python function that called it) and the project's own
    functions with their callees (inclusive)."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        leaf[frames[-1]] += c
        names = {re.sub(r":\d+\)$", ")", f) for f in frames}
        for name in names:
            if "(app/" in name:
                inclusive[name] += c
    share = (lambda c: round(c / total, 3)) if total else (lambda c: 0.0)
    return {
        "samples": total,
        "busy_share": round(total / (rate * seconds), 3),  # of one core, all threads summed
        "top_self": [[f, share(c)] for f, c in leaf.most_common(top)],
        "top_app_inclusive": [[f, share(c)] for f, c in inclusive.most_common(top)],
    }


def profile_level(cfg: Config, server: Server, n: int, body: Path, workdir: Path,
                  tool: str) -> dict[str, Any]:
    """h2load at `n` streams in the background, py-spy on every busy process of the server
    (not the supervisor or resource tracker) for profile_s seconds."""
    rate = 100
    seconds = max(1, round(cfg.profile_s))  # py-spy takes whole seconds
    requests = n * MAX_REQUESTS_PER_CONNECTION  # stopped once the profile is taken
    load = subprocess.Popen(h2load_args(cfg, server.url, body, n, requests),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, Any] = {"server": server.spec.key, "level": n, "seconds": seconds,
                           "rate_hz": rate, "processes": []}
    try:
        time.sleep(1.0 + min(n / 256, 2.0))  # connections open and streams running
        spies = []
        for pid, role in server.roles.items():
            if role in ("supervisor", "tracker"):
                continue
            path = workdir / f"profile-{server.spec.key}-{n}-{pid}.txt"
            spies.append((pid, role, path, subprocess.Popen(
                [tool, "record", "--pid", str(pid), "--duration", str(seconds),
                 "--rate", str(rate), "--format", "raw", "--nonblocking", "-o", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        for pid, role, path, spy in spies:
            _, err = spy.communicate(timeout=seconds + 60)
            entry: dict[str, Any] = {"pid": pid, "role": role}
            if spy.returncode != 0 or not path.exists():
                entry["error"] = err.strip()[-300:] or "no output"
            else:
                entry.update(summarise_profile(path.read_text(), rate, seconds))
            out["processes"].append(entry)
    finally:
        if load.poll() is None:
            load.terminate()
        load.wait(30)
        wait_idle(server)
    return out


# --- one model ------------------------------------------------------------------------------
def host_sampling_spec(variant: str | None) -> ServerSpec:
    """Today's server without its decode graph: one character per call, sampled on the host."""
    return ServerSpec("after_host", "after, CHARLSTM_DECODE_STEPS=0 (host sampling)", ROOT,
                      {"CHARLSTM_DECODE_STEPS": "0"}, variant)


def free_specs(cfg: Config, before_code: Path | None) -> list[ServerSpec]:
    specs = [
        ServerSpec("after", "after (default: 1 HTTP worker on 2 cores)", ROOT, {}, None),
        ServerSpec("after_w2", "after, CHARLSTM_HTTP_WORKERS=2", ROOT,
                   {"CHARLSTM_HTTP_WORKERS": "2"}, None),
        host_sampling_spec(None),
    ]
    if before_code is not None:
        specs.append(ServerSpec("before", f"before ({cfg.before_ref})", before_code, {}, None))
    return specs


def real_specs(cfg: Config, before_code: Path | None, model_dir: Path) -> list[ServerSpec]:
    meta = read_metadata(model_dir)
    default = serving_variant(meta, "cpu", "auto")
    specs = [ServerSpec("after", f"after (default: {default or 'fp32'} graph)", ROOT, {},
                        default), host_sampling_spec(default)]
    if default is not None:
        specs.append(ServerSpec("after_fp32", "after, CHARLSTM_VARIANT=fp32", ROOT,
                                {"CHARLSTM_VARIANT": "fp32"}, None))
    elif any(v.name == "int8" for v in meta.variants):  # listed, not batch-invariant
        specs.append(ServerSpec("after_int8", "after, CHARLSTM_VARIANT=int8", ROOT,
                                {"CHARLSTM_VARIANT": "int8"}, "int8"))
    if before_code is not None:
        specs.append(ServerSpec("before", f"before ({cfg.before_ref})", before_code, {}, None))
    return specs


def chosen(cfg: Config, specs: list[ServerSpec]) -> list[ServerSpec]:
    """The specs --servers names (all of them without it)."""
    if cfg.servers is None:
        return specs
    return [s for s in specs if s.key in cfg.servers]


def body_file(path: Path, chars: int) -> Path:
    path.write_text(json.dumps({"seed_text": SEED_TEXT, "max_new_chars": chars, "stream": True,
                                "temperature": TEMPERATURE}), encoding="utf-8")
    return path


def measure_model(cfg: Config, name: str, model_dir: Path, levels: list[int], chars: int,
                  specs: list[ServerSpec], workdir: Path) -> dict[str, Any]:
    """Per level: each server in turn (two passes, the second in reverse order), with a
    slice of the raw loop of every graph served before, between and after them."""
    opts = RuntimeOptions(device="cpu", intra_op_threads=1)
    variants = sorted({s.variant for s in specs}, key=lambda v: v or "")
    models = {v: load_model(model_dir, opts, v) for v in variants}
    graph_of = {v: m.graph_file for v, m in models.items()}
    body = body_file(workdir / f"body-{name}.json", chars)
    pilot = body_file(workdir / f"pilot-{name}.json", max(1, chars // PILOT_FRACTION))
    models_dir = model_dir.parent
    arch = read_metadata(model_dir).architecture
    raw: list[dict[str, Any]] = []
    rows: list[LevelResult] = []
    with servers(specs, models_dir, model_dir.name, workdir) as running:
        for s in running:
            if s.graph != graph_of[s.spec.variant]:
                log(f"warning: {s.spec.label} serves {s.graph}, its raw baseline runs "
                    f"{graph_of[s.spec.variant]}")
        for n in levels:
            # Raw slices between every two h2load runs: each server's ceiling is the mean of
            # the slices right before and after its own runs, so a neighbour's burst that
            # slows one run slows its baseline too.
            slices = [raw_slice(cfg, models, n, chars)]
            samples: dict[str, list[Sample]] = {s.spec.key: [] for s in running}
            around: dict[str, list[RawResult]] = {s.spec.key: [] for s in running}
            # Two passes, servers in turn and then in reverse, so drifting load on a shared
            # machine falls on each about equally; one when a single wave already takes long.
            for p in range(PASSES):
                order = running if p % 2 == 0 else running[::-1]
                longest = 0.0
                for s in order:
                    t0 = time.perf_counter()
                    samples[s.spec.key].append(sample_level(cfg, s, n, body, pilot,
                                                            cfg.target_s / PASSES))
                    longest = max(longest, time.perf_counter() - t0)
                    slices.append(raw_slice(cfg, models, n, chars))
                    v = s.spec.variant
                    around[s.spec.key] += [slices[-2][v], slices[-1][v]]
                if longest > 0.75 * cfg.target_s:
                    break
            for v in models:
                mine = [sl[v] for sl in slices]
                rates = [x.chars_per_s for x in mine]
                raw.append({"graph": graph_of[v], "batch": n, "chars": chars,
                            "chars_per_s": round(float(np.mean(rates)), 1),
                            "min_chars_per_s": min(rates), "max_chars_per_s": max(rates),
                            "cpu_us_per_char": round(float(np.mean(
                                [x.cpu_us_per_char for x in mine])), 3),
                            "slices": [asdict(x) for x in mine]})
                log(f"{name} {n:5d} raw {graph_of[v]:17s} {raw[-1]['chars_per_s']:12,.0f} "
                    f"chars/s (slices {min(rates):,.0f} to {max(rates):,.0f})")
            level_rows = []
            for s in running:
                r = level_result(name, s, n, chars, samples[s.spec.key])
                base = around[s.spec.key]
                r.raw_chars_per_s = round(float(np.mean([x.chars_per_s for x in base])), 1)
                r.ratio = round(r.chars_per_s / r.raw_chars_per_s, 3)
                r.raw_cpu_us_per_char = round(float(np.mean([x.cpu_us_per_char
                                                             for x in base])), 3)
                if r.cpu_us_per_char:
                    r.cpu_ratio = round(r.raw_cpu_us_per_char / r.cpu_us_per_char, 3)
                level_rows.append(r)
                log(f"{name} {n:5d} streams  {s.spec.label:45s} {r.chars_per_s:12,.0f} "
                    f"chars/s = {r.ratio:.2f} x raw  {r.cpu_us_per_char or 0:8.1f} "
                    f"CPU-us/char  batch {r.mean_batch}  failed {r.failed}  passes {r.passes}")
            rows.extend(level_rows)
        verdicts = [t for t in judge(name, rows) if t["status"].startswith("MISS")
                    and t["server"] == "after"]
        profiles = []
        tool = py_spy()
        if verdicts and cfg.profile and tool is None:
            log("py-spy not found (pip install py-spy): no profiles")
        elif verdicts and cfg.profile and tool is not None:
            by_key = {s.spec.key: s for s in running}
            for t in verdicts:
                log(f"profiling {name} at {t['level']} streams ({t['target']}: {t['value']})")
                profiles.append(profile_level(cfg, by_key["after"], t["level"], body, workdir,
                                              tool))
    return {
        "model": (f"free: generated, 1 epoch on the first {FREE_CORPUS_CHARS:,} characters of "
                  f"{cfg.corpus.name}") if name == "free" else shown(model_dir),
        "architecture": {"layers": arch.layers, "units": arch.units,
                         "parameters": arch.parameters},
        "chars_per_request": chars, "seed_text": SEED_TEXT,
        "servers": [asdict(s) | {"code": shown(s.code)} for s in specs],
        "raw": raw, "levels": [asdict(r) for r in rows], "profiles": profiles,
    }


def judge(name: str, rows: list[LevelResult]) -> list[dict[str, Any]]:
    """The issue's targets, for every server measured (the goal is about `after`)."""
    out = []
    for model, level, goal in TARGETS:
        if model != name:
            continue
        servers_seen = dict.fromkeys(r.server for r in rows)
        for key in servers_seen:
            hit = [r for r in rows if r.server == key and r.level == level]
            value = hit[0].ratio if hit else None
            status = ("NOT MEASURED" if value is None else "MET" if value >= goal else "MISS")
            if hit and hit[0].failed:
                status += f" ({hit[0].failed} streams failed)"
            what = "single stream" if level == 1 else f"{level} streams"
            out.append({"model": model, "server": key, "level": level, "goal": goal,
                        "value": value, "status": status,
                        "target": f"{model}: service >= {goal:g} x raw, {what}"})
    return out


# --- report ---------------------------------------------------------------------------------
def pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.0f}%"


def section_md(title: str, sec: dict[str, Any]) -> list[str]:
    rows = sec["levels"]
    keys = list(dict.fromkeys(r["server"] for r in rows))
    labels = {r["server"]: r["label"] for r in rows}
    by = {(r["server"], r["level"]): r for r in rows}
    levels = sorted({r["level"] for r in rows})
    raw_by = {(x["graph"], x["batch"]): x for x in sec["raw"]}
    graphs = list(dict.fromkeys(x["graph"] for x in sec["raw"]))
    a = sec["architecture"]
    lines = [f"## {title}", "",
             f"`{sec['model']}`: {a['layers']} x LSTM({a['units']}), {a['parameters']:,} "
             f"parameters. Every request: seed {sec['seed_text']!r}, "
             f"{sec['chars_per_request']:,} characters streamed (SSE), temperature "
             f"{TEMPERATURE}.", "",
             "Delivered chars/s (successful requests x characters / h2load's wall time); "
             "raw = the same graph's loop at batch = streams, in this process, mean of the "
             "level's raw slices; each ratio divides by the slices right around that "
             "server's own runs:", ""]
    head = ["streams", *[f"raw {g}" for g in graphs], *[labels[k] for k in keys],
            *[f"{k} / raw" for k in keys]]
    if "before" in keys and "after" in keys:
        head.append("after / before")
    if "after_host" in keys and "after" in keys:
        head.append("decode graph / host sampling")
    table = []
    for n in levels:
        row: list[Any] = [n, *[raw_by[(g, n)]["chars_per_s"] for g in graphs]]
        row += [by[(k, n)]["chars_per_s"] for k in keys]
        row += [f"**{by[(k, n)]['ratio']:.2f}**" for k in keys]
        if "before" in keys and "after" in keys:
            row.append(f"{by[('after', n)]['chars_per_s'] / by[('before', n)]['chars_per_s']:.2f}"
                       if by[("before", n)]["chars_per_s"] else None)
        if "after_host" in keys and "after" in keys:
            host = by[("after_host", n)]["chars_per_s"]
            row.append(f"{by[('after', n)]['chars_per_s'] / host:.2f}" if host else None)
        table.append(row)
    lines += [md_table(head, table), ""]
    lines += ["Per level and server:", "",
              md_table(["streams", "server", "graph", "chars/s", "raw chars/s (around)",
                        "/ raw", "server CPU-us/char", "raw CPU-us/char", "CPU raw / server",
                        "server cores", "TTFB mean / max ms", "server TTFT ms", "mean batch",
                        "h2load CPU (of 1 core)", "other load (cores)", "requests", "failed"],
                       [[r["level"], r["server"], r["graph"], r["chars_per_s"],
                         r["raw_chars_per_s"], r["ratio"], r["cpu_us_per_char"],
                         r["raw_cpu_us_per_char"], r["cpu_ratio"], r["server_cores"],
                         f"{cell(r['ttfb_ms'].get('mean'))} / {cell(r['ttfb_ms'].get('max'))}",
                         r["server_ttft_ms"], r["mean_batch"], pct(r["loadgen_core_share"]),
                         r["other_cores"], r["requests"], r["failed"]]
                        for n in levels for k in keys for r in [by[(k, n)]]]), ""]
    broken = [r for r in rows if r["failed"] or r["server_errors"]]
    if broken:
        lines += ["**Failed streams** (h2load counts a 200 whose stream ended with an error "
                  "event as a success; these rows count only the streams the server finished "
                  "at full length):", ""]
        for r in broken:
            lines.append(f"- {r['server']} at {r['level']} streams: {r['failed']:,} of "
                         f"{r['requests']:,} requests failed"
                         + (f"; server log: `{r['server_errors'][0][:220]}`"
                            f" ({len(r['server_errors'])} line(s) kept)"
                            if r["server_errors"] else ""))
        lines.append("")
    roles = sorted({role for r in rows for role in r["cpu_us_per_char_by_role"]}
                   - {"tracker", "supervisor"})
    lines += ["Server CPU-us per delivered character, by process:", "",
              md_table(["streams", "server", *roles],
                       [[r["level"], r["server"],
                         *[r["cpu_us_per_char_by_role"].get(role) for role in roles]]
                        for n in levels for k in keys for r in [by[(k, n)]]]), ""]
    for p in sec["profiles"]:
        lines += [f"### Profile: {p['server']} at {p['level']} streams (py-spy, "
                  f"{p['seconds']:g} s at {p['rate_hz']} Hz, non-blocking)", ""]
        for proc in p["processes"]:
            if "error" in proc:
                lines += [f"- {proc['role']} (pid {proc['pid']}): py-spy failed: "
                          f"{proc['error']}"]
                continue
            tops = ", ".join(f"`{f}` {s * 100:.0f}%" for f, s in proc["top_self"])
            incl = ", ".join(f"`{f}` {s * 100:.0f}%" for f, s in proc["top_app_inclusive"])
            lines += [f"- **{proc['role']}** (pid {proc['pid']}), busy "
                      f"{proc['busy_share'] * 100:.0f}% of a core; on top of the stack: {tops}",
                      f"  - app functions with their callees: {incl}"]
        lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    m, s = report["meta"], report["settings"]
    git = m["git"]
    lines = [
        f"# Serving ceiling: {m['hostname']}, {m['started'][:10]}", "",
        f"{m['cpu']}, {m['cpu_count_logical']} logical CPUs ({m['cpu_affinity']} usable), "
        f"{m['memory_gb']} GB, shared with other work; load average {m['loadavg_start']} at "
        f"start, {m['loadavg_end']} at end. Python {m['python']}, onnxruntime "
        f"{m['onnxruntime']}, {m['h2load']}; commit {(git['commit'] or '?')[:12]}"
        f"{' (dirty)' if git['dirty'] else ''}; before = {s['before_ref']}"
        + (" (not run)" if not s["before"] else "")
        + ("; **quick mode** (numbers are only a smoke test)" if s["quick"] else "") + ".", "",
        "h2load --h1 drives each server: N connections, each sending its next POST /generate "
        "(stream) when the last one ends; CHARLSTM_MAX_BATCH 1024, queue, wait and time "
        "limits out of the way; one onnxruntime thread everywhere. Only ratios within this "
        "run mean anything.", "",
        "## Targets", "",
        md_table(["target", "server", "measured", "status"],
                 [[t["target"], t["server"], t["value"], f"**{t['status']}**"]
                  for t in report["targets"]]), "",
    ]
    lines += section_md("Free model (the serving ceiling)", report["free"])
    if report.get("real"):
        lines += section_md("Real model", report["real"])
    lines += [
        "Columns: *server CPU-us/char* = utime + stime of every server process during the "
        "level / delivered characters; *server cores* = that CPU / wall; *TTFB* = h2load's "
        "time to 1st byte (connection start to the response head, sent at admission; one "
        "sample per connection, its first request); *server TTFT* = the engine's submission "
        "to first character, mean over the level's requests (/metrics); *mean batch* = rows "
        "per decode step (/metrics); *h2load CPU* = its own CPU time / wall; *other load* = "
        "busy cores on the machine not used by the server, h2load or this process; *raw "
        "chars/s (around)* and *raw CPU-us/char*: the raw slices right before and after that "
        "server's runs; *CPU raw / server* = raw CPU per character / server CPU per "
        "character (1 = the server spends no more CPU per character than the bare loop; "
        "less sensitive to neighbours than throughput).", ""]
    return "\n".join(lines)


# --- entry point ----------------------------------------------------------------------------


def before_checkout(cfg: Config, workdir: Path) -> Path | None:
    """The old code: --before-dir, or `git archive <ref> app` into the work folder."""
    if not cfg.before:
        return None
    if cfg.before_dir is not None:
        if not (cfg.before_dir / "app" / "__main__.py").is_file():
            raise SystemExit(f"--before-dir {cfg.before_dir}: no app/__main__.py there")
        return cfg.before_dir.resolve()
    dest = workdir / f"before-{cfg.before_ref}"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", cfg.before_ref, "app"], cwd=ROOT,
                             capture_output=True, timeout=60, check=False)
    if archive.returncode != 0:
        log(f"cannot read {cfg.before_ref} from git ({archive.stderr.decode()[:200].strip()}):"
            " no 'before' servers (give --before-dir)")
        return None
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True,
                   timeout=60)
    return dest


def h2load_version(path: str) -> str:
    res = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                         check=False)
    return res.stdout.strip() or "h2load"


def run(cfg: Config) -> dict[str, Any]:
    meta = machine_facts()
    meta["loadavg_start"] = load_average()
    meta["h2load"] = h2load_version(cfg.h2load)
    raise_open_files_limit(2 * CAPACITY + 512)  # h2load's and the servers' sockets
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        before = before_checkout(cfg, work)
        if cfg.free_model is not None:
            free_dir = work / "free-models" / "free"
            shutil.copytree(cfg.free_model, free_dir)
        else:
            log("training and exporting the free model (1 x LSTM(8), 1 epoch)")
            free_dir = build_free_model(work / "free", cfg.corpus)
        free = measure_model(cfg, "free", free_dir, cfg.levels, cfg.free_chars,
                             chosen(cfg, free_specs(cfg, before)), work)
        real = None
        if cfg.real_levels:
            real_dir = work / "real-models" / cfg.real_model.resolve().name
            # A copy: the service refuses model folders that link outside its models folder.
            shutil.copytree(cfg.real_model.resolve(), real_dir)
            real = measure_model(cfg, "real", real_dir, cfg.real_levels, cfg.real_chars,
                                 chosen(cfg, real_specs(cfg, before, real_dir)), work)
            real["model"] = shown(cfg.real_model)
    meta["loadavg_end"] = load_average()
    settings = {k: shown(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    settings |= {"server_env": SERVER_ENV, "before": before is not None}
    targets = [t for name, sec in (("free", free), ("real", real)) if sec is not None
               for t in judge(name, [LevelResult(**r) for r in sec["levels"]])]
    return {"meta": meta, "settings": settings, "targets": targets, "free": free,
            "real": real}




def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.serving", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--levels", help="concurrent streams for the free model "
                   f"(default {DEFAULTS['levels']})")
    p.add_argument("--real-levels", help="concurrent streams for the real model; empty skips "
                   f"it (default {DEFAULTS['real_levels']})")
    p.add_argument("--free-chars", type=int, help="characters per request, free model "
                   f"(default {DEFAULTS['free_chars']})")
    p.add_argument("--real-chars", type=int, help="characters per request, real model "
                   f"(default {DEFAULTS['real_chars']})")
    p.add_argument("--target-s", type=float, help="about this many seconds of h2load per "
                   f"level and server (default {DEFAULTS['target_s']})")
    p.add_argument("--raw-s", type=float, help="seconds of each raw-loop slice (one before "
                   f"the servers of a level and one after each h2load run; default "
                   f"{DEFAULTS['raw_s']})")
    p.add_argument("--profile-s", type=float, help="py-spy seconds per missed target "
                   f"(default {DEFAULTS['profile_s']})")
    p.add_argument("--no-profile", action="store_true", help="no py-spy profiles")
    p.add_argument("--real-model", type=Path, default=ROOT / "models" / "shakespeare")
    p.add_argument("--free-model", type=Path, help="an exported free model folder to reuse "
                   "(default: train and export one)")
    p.add_argument("--corpus", type=Path,
                   default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
                   help=f"text for the free model (its first {FREE_CORPUS_CHARS:,} characters)")
    p.add_argument("--before-ref", default=BEFORE_REF, help="git commit of the 'before' server")
    p.add_argument("--before-dir", type=Path, help="a checkout of the 'before' code (default: "
                   "`git archive` of --before-ref)")
    p.add_argument("--no-before", action="store_true", help="only today's servers")
    p.add_argument("--servers", help="comma-separated server keys to run (after, after_w2, "
                   "after_host, after_fp32, after_int8, before; default: all)")
    p.add_argument("--h2load", default=shutil.which("h2load"), help="h2load binary "
                   "(apt-get install nghttp2-client)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny settings for a smoke test: {QUICK}")
    return p.parse_args(argv)


def config(args: argparse.Namespace) -> Config:
    base = QUICK if args.quick else DEFAULTS

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return base[name] if value is None else value

    if not args.h2load:
        raise SystemExit("h2load not found: apt-get install -y nghttp2-client (or --h2load)")
    free_model = args.free_model
    if free_model is not None and not (free_model / "model.json").is_file():
        raise SystemExit(f"--free-model {free_model}: not a model folder")
    if free_model is None and not args.corpus.is_file():
        raise SystemExit(f"--corpus {args.corpus}: missing")
    if not (args.real_model / "model.json").is_file():
        raise SystemExit(f"--real-model {args.real_model}: not a model folder")
    for name in ("free_chars", "real_chars"):
        if pick(name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    real_levels = pick("real_levels")
    return Config(
        levels=int_list(pick("levels"), most=CAPACITY),
        real_levels=int_list(real_levels, most=CAPACITY) if real_levels.strip() else [],
        free_chars=pick("free_chars"), real_chars=pick("real_chars"),
        target_s=pick("target_s"), raw_s=pick("raw_s"), profile_s=pick("profile_s"),
        real_model=args.real_model, free_model=free_model, corpus=args.corpus,
        before_ref=args.before_ref, before_dir=args.before_dir, before=not args.no_before,
        profile=not args.no_profile, out=args.out, quick=args.quick, h2load=args.h2load,
        servers=[k.strip() for k in args.servers.split(",") if k.strip()] if args.servers
        else None,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = config(parse_args(argv))
    report = run(cfg)
    json_path, md_path = write_results(cfg.out, "serving", cfg.quick, report, markdown(report))
    log(f"wrote {json_path} and {md_path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
