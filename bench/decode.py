"""Decode speed, from the reference notebook loop to the HTTP service, in one run.

    python -m bench.decode [--quick] [--model models/shakespeare] [--device auto|cpu|cuda] ...

Every stage does the same work per request (prefill `--seed-chars`, then `--new-chars`
sampled characters at temperature 1) on the same model, in this order:

    raw       onnxruntime alone: OnnxModel.step with carried state + vectorised sampling,
              one batch of B rows: the ceiling the engine and the service are compared with
    engine    the engine loop on a thread of this process (the in-process layout's client),
              N requests submitted together, no HTTP
    http      a real `python -m app` server: N streaming clients, then N JSON clients
    notebook  the reference Keras loop (model.predict once per character), in a subprocess
              so TensorFlow and its threads never overlap the other measurements

Writes <out>/decode-<host>-<YYYYMMDD>.{json,md,png} and prints the Markdown report.
bench/README.md says what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import psutil
from httpx_sse import aconnect_sse

from app import rng
from app.artifact import ArtifactError
from app.engine.batch import Sequence
from app.engine.client import ClientTimings, EngineClient, ThreadEngine, make_client
from app.engine.core import EngineCore
from app.engine.loop import LoopTimings
from app.engine.messages import Chars, Finished, GenerationRequest, Sampling
from app.runtime import OnnxModel, RuntimeOptions, load_model
from app.sampling import sample_next
from app.settings import Settings
from bench.common import (
    ROOT,
    cell,
    int_list,
    latency_ms,
    load_average,
    machine_facts,
    md_table,
    shown,
    write_results,
)

DEFAULTS: dict[str, Any] = {
    "seed_chars": 100, "new_chars": 500, "concurrency": "1,16,64,256",
    "batches": "1,4,16,64,256", "notebook_chars": 40, "min_time": 2.0,
}
QUICK: dict[str, Any] = {
    "seed_chars": 100, "new_chars": 20, "concurrency": "1,4", "batches": "1,4",
    "notebook_chars": 5, "min_time": 0.0,
}
TEMPERATURE = 1.0
NOTEBOOK_WINDOW = 60  # characters of one-hot context, as in the reference notebooks
MAX_ROUNDS = 50
# Generous limits: the benchmark measures how long things take, it must not truncate them.
TIME_LIMIT_S = 600.0
WARMUP_CHARS = 8
CAPACITY = 1024  # engine and server rows and queue, at least this many (as the issue asks)
TARGET_CONCURRENCY = 64


@dataclass(frozen=True)
class Config:
    model: Path
    seed_chars: int
    new_chars: int
    concurrency: list[int]
    batches: list[int]  # raw batch sizes: the given ones plus every concurrency level
    threads: int
    out: Path
    quick: bool
    device: str
    notebook_chars: int
    min_time: float  # repeat a level until this many seconds have passed (max MAX_ROUNDS)

    @property
    def capacity(self) -> int:
        return max(CAPACITY, *self.concurrency, *self.batches)


STARTED = time.perf_counter()  # progress lines show seconds since the benchmark began


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {msg}", file=sys.stderr, flush=True)


def seed_texts(chars: list[str], n: int, length: int, first: int) -> list[str]:
    """Distinct seeds of random vocabulary characters: an LSTM step costs the same whatever
    the text, and every model can spell these."""
    return ["".join(np.random.default_rng(first + i).choice(chars, length))
            for i in range(n)]


def more_rounds(started: float, done: int, min_time: float) -> bool:
    return done < MAX_ROUNDS and time.perf_counter() - started < min_time


# --- 1. raw ceiling -------------------------------------------------------------------------
@dataclass
class RawResult:
    batch: int
    rounds: int
    generated_chars: int
    wall_s: float
    chars_per_s: float  # the same work as a request: prefill + decode (used for the ratios)
    decode_chars_per_s: float  # decode steps and sampling only, prefill left out
    prefill_ms: float  # one prefill call of (batch, seed_chars)
    step_ms: float  # onnxruntime, per decode step of the whole batch
    sample_ms: float  # rng.uniforms + sample_next, per step of the whole batch


def raw_round(model: OnnxModel, seed_ids: npt.NDArray[np.int32], new_chars: int
              ) -> tuple[float, float, float, int]:
    """Prefill, then sample and step with carried state: (prefill_s, step_s, sample_s, steps)."""
    b = seed_ids.shape[0]
    temperature = np.full(b, TEMPERATURE, np.float32)
    top_k = np.zeros(b, np.int64)
    top_p = np.ones(b, np.float32)
    keys = rng.row_keys(np.arange(b))
    counters = np.zeros(b, np.uint64)
    t0 = time.perf_counter()
    logits, states = model.step(seed_ids, model.zero_states(b))
    last = logits[:, -1, :]
    prefill_s = time.perf_counter() - t0
    step_s = sample_s = 0.0
    steps = 0
    # As in the engine: new_chars draws, and a step after every draw but the last.
    for i in range(new_chars):
        t1 = time.perf_counter()
        nxt = sample_next(last, temperature, top_k, top_p, rng.uniforms(keys, counters))
        counters += np.uint64(1)
        t2 = time.perf_counter()
        sample_s += t2 - t1
        if i == new_chars - 1:
            break
        logits, states = model.step(nxt.astype(np.int32)[:, None], states)
        last = logits[:, -1, :]
        step_s += time.perf_counter() - t2
        steps += 1
    return prefill_s, step_s, sample_s, steps


def measure_raw(model: OnnxModel, cfg: Config, batch: int) -> RawResult:
    texts = seed_texts(model.vocab.chars, batch, cfg.seed_chars, first=0)
    seed_ids = np.stack([model.vocab.encode(t) for t in texts]).astype(np.int32)  # (B, T)
    raw_round(model, seed_ids, min(WARMUP_CHARS, cfg.new_chars))
    totals = np.zeros(4)  # prefill_s, step_s, sample_s, steps
    rounds = 0
    started = time.perf_counter()
    while rounds == 0 or more_rounds(started, rounds, cfg.min_time):
        totals += raw_round(model, seed_ids, cfg.new_chars)
        rounds += 1
    wall = time.perf_counter() - started
    prefill, step, sample, steps = (float(x) for x in totals)
    chars = rounds * batch * cfg.new_chars
    return RawResult(
        batch=batch, rounds=rounds, generated_chars=chars, wall_s=round(wall, 4),
        chars_per_s=round(chars / wall, 1),
        decode_chars_per_s=round(chars / max(wall - prefill, 1e-9), 1),
        prefill_ms=round(prefill / rounds * 1e3, 3),
        step_ms=round(step / max(steps, 1) * 1e3, 4),
        sample_ms=round(sample / (rounds * cfg.new_chars) * 1e3, 4),
    )


# --- 2. engine in-process -------------------------------------------------------------------
class StepClock:
    """EngineObserver that adds up the engine's own onnxruntime timings (worker thread)."""

    def __init__(self) -> None:
        self.steps = 0
        self.step_s = 0.0
        self.rows = 0
        self.prefill_s = 0.0

    def on_step(self, batch: int, seconds: float) -> None:
        self.steps += 1
        self.step_s += seconds
        self.rows += batch

    def on_prefill(self, rows: int, chars: int, seconds: float) -> None:
        self.prefill_s += seconds

    def on_queue(self, waiting: int, active: int) -> None:
        pass

    def on_refusal_verdict(self, false: bool) -> None:
        pass

    def on_estimate(self, wait_s: float, chars_per_s: float) -> None:
        pass

    def on_cache(self, hit: bool, chars_saved: int, size_bytes: int, entries: int) -> None:
        pass

    def on_limits(self, max_batch: int, cache_bytes: int) -> None:
        pass

    def on_key(self, key: str, queued: int, rows: int) -> None:
        pass

    def on_key_finish(self, key: str, outcome: str, seed_chars: int, generated: int) -> None:
        pass

    def on_key_refused(self, key: str, cause: str) -> None:
        pass

    def on_finish(self, request: Sequence) -> None:
        pass

    def snapshot(self) -> tuple[int, float, int, float]:
        return self.steps, self.step_s, self.rows, self.prefill_s


@dataclass
class EngineResult:
    concurrency: int
    rounds: int
    requests: int
    generated_chars: int
    wall_s: float
    chars_per_s: float
    errors: int
    ttft_ms: dict[str, Any]  # submit -> first sampled character
    e2e_ms: dict[str, Any]  # submit -> finished
    steps: int
    mean_batch: float
    step_ms: float  # onnxruntime per decode step, timed by the engine itself
    prefill_ms: float  # all prefill calls of a round
    other_ms_per_step: float  # wall time not in onnxruntime: sampling, bookkeeping, wake-ups
    onnxruntime_share: float  # (steps + prefill) / wall


@dataclass
class Done:
    chars: int
    finished: Finished


async def one_request(engine: EngineClient, req: GenerationRequest) -> Done:
    chars, finished = 0, None
    async for e in engine.generate(req):
        if isinstance(e, Chars):
            chars += len(e.ids)
        elif isinstance(e, Finished):
            finished = e
    assert finished is not None
    return Done(chars, finished)


async def engine_round(engine: EngineClient, model: OnnxModel, cfg: Config, n: int, first: int,
                       new_chars: int) -> tuple[float, list[Done]]:
    reqs = [GenerationRequest(seed_ids=model.vocab.encode(t).tolist(), max_new=new_chars,
                              sampling=Sampling(temperature=TEMPERATURE, seed=first + i),
                              time_limit_s=TIME_LIMIT_S)
            for i, t in enumerate(seed_texts(model.vocab.chars, n, cfg.seed_chars, first))]
    t0 = time.perf_counter()
    done = list(await asyncio.gather(*(one_request(engine, r) for r in reqs)))
    return time.perf_counter() - t0, done


async def measure_engine(model: OnnxModel, cfg: Config) -> list[EngineResult]:
    clock = StepClock()
    core = EngineCore(model, max_batch=cfg.capacity, max_queue=cfg.capacity, max_wait_s=1e9,
                      observer=clock)
    thread = ThreadEngine(core, model.provider, model.graph_file, LoopTimings())
    engine = make_client(model.name, thread.address, ClientTimings(), thread)
    engine.start()
    await engine.wait_alive(60)
    results = []
    try:
        for n in cfg.concurrency:
            await engine_round(engine, model, cfg, n, 10**6, min(WARMUP_CHARS, cfg.new_chars))
            before = clock.snapshot()
            wall = 0.0
            reqs: list[Done] = []
            rounds = 0
            started = time.perf_counter()
            while rounds == 0 or more_rounds(started, rounds, cfg.min_time):
                w, rs = await engine_round(engine, model, cfg, n, rounds * n, cfg.new_chars)
                wall, reqs, rounds = wall + w, reqs + rs, rounds + 1
            steps, step_s, rows, prefill_s = (a - b for a, b in zip(clock.snapshot(), before,
                                                                    strict=True))
            results.append(engine_result(n, rounds, wall, reqs, int(steps), step_s, int(rows),
                                         prefill_s, cfg.new_chars))
            log(f"engine  concurrency {n:5d}: {results[-1].chars_per_s:12,.0f} chars/s")
    finally:
        engine.close()
    return results


def engine_result(n: int, rounds: int, wall: float, reqs: list[Done], steps: int,
                  step_s: float, rows: int, prefill_s: float, new_chars: int) -> EngineResult:
    chars = sum(r.chars for r in reqs)
    errors = sum(r.finished.reason != "length" or r.chars != new_chars for r in reqs)
    return EngineResult(
        concurrency=n, rounds=rounds, requests=len(reqs), generated_chars=chars,
        wall_s=round(wall, 4), chars_per_s=round(chars / wall, 1), errors=errors,
        ttft_ms=latency_ms([r.finished.started.first_at - r.finished.submitted_at
                            for r in reqs if r.finished.started]),
        e2e_ms=latency_ms([r.finished.finished_at - r.finished.submitted_at for r in reqs]),
        steps=steps, mean_batch=round(rows / max(steps, 1), 2),
        step_ms=round(step_s / max(steps, 1) * 1e3, 4),
        prefill_ms=round(prefill_s / rounds * 1e3, 3),
        other_ms_per_step=round((wall - step_s - prefill_s) / max(steps, 1) * 1e3, 4),
        onnxruntime_share=round((step_s + prefill_s) / wall, 3),
    )


# --- 3. HTTP service ------------------------------------------------------------------------
@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    ps: psutil.Process
    log_path: Path

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def peak_rss_mb(self) -> float | None:
        """The kernel's own high-water mark (VmHWM): catches peaks between samples."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(cfg: Config, workdir: Path) -> Iterator[Server]:
    """`python -m app` serving only the benchmarked model (so its memory is all we measure)."""
    models_dir = workdir / "models"
    models_dir.mkdir()
    name = cfg.model.resolve().name
    # A copy: the service refuses model folders that link outside its models folder.
    shutil.copytree(cfg.model.resolve(), models_dir / name)
    port = free_port()
    env = {
        **os.environ, "PYTHONUNBUFFERED": "1", "CHARLSTM_MODELS_DIR": str(models_dir),
        "CHARLSTM_DEFAULT_MODEL": name, "CHARLSTM_HOST": "127.0.0.1",
        "CHARLSTM_PORT": str(port), "CHARLSTM_DEVICE": cfg.device,
        "CHARLSTM_MAX_BATCH": str(cfg.capacity), "CHARLSTM_MAX_QUEUE": str(cfg.capacity),
        "CHARLSTM_LOG_LEVEL": "warning", "CHARLSTM_INTRA_OP_THREADS": str(cfg.threads),
        "CHARLSTM_TIME_LIMIT_S": str(TIME_LIMIT_S),
        "CHARLSTM_MAX_NEW_CHARS": str(max(cfg.new_chars, 5000)),
        "CHARLSTM_MAX_SEED_CHARS": str(max(cfg.seed_chars, 4000)), "CHARLSTM_API_KEYS": "",
    }
    log_path = workdir / "server.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, psutil.Process(proc.pid), log_path)
    try:
        wait_ready(server)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # drains: nothing is running by now
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def wait_ready(server: Server, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/ready", timeout=1, trust_env=False).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s:\n{server.log_tail()}")


class RssSampler:
    """RSS of one process every `interval_s`, on a thread so a busy event loop cannot skip it."""

    def __init__(self, ps: psutil.Process, interval_s: float = 0.05) -> None:
        self.ps = ps
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []  # (perf_counter, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> bool:
        """One sample now (also called at the edges of each level, which may be shorter than
        the interval); False once the process is gone."""
        try:
            self.samples.append((time.perf_counter(), self.ps.memory_info().rss))
        except psutil.Error:
            return False
        return True

    def _run(self) -> None:
        while self.sample() and not self._stop.wait(self.interval_s):
            pass

    def peak_mb(self, since: float = 0.0, until: float = float("inf")) -> float | None:
        rss = [b for t, b in self.samples if since <= t <= until]
        return round(max(rss) / 2**20, 1) if rss else None


@dataclass
class Reply:
    chars: int = 0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    gaps: list[float] = field(default_factory=list)  # inter-character gaps, see stream_one
    error: str | None = None


def body(model: str, text: str, seed: int, new_chars: int, stream: bool
         ) -> dict[str, Any]:
    return {"model": model, "seed_text": text, "max_new_chars": new_chars,
            "temperature": TEMPERATURE, "seed": seed, "stream": stream}


def check_summary(reply: Reply, summary: dict[str, Any] | None, new_chars: int) -> None:
    if reply.error is not None:
        return
    if summary is None:
        reply.error = "no done event"
    elif summary.get("finish_reason") != "length":
        reply.error = f"finish_reason {summary.get('finish_reason')}: {summary.get('error')}"
    elif reply.chars != new_chars:
        reply.error = f"{reply.chars} characters instead of {new_chars}"


async def stream_one(client: httpx.AsyncClient, payload: dict[str, Any]) -> Reply:
    """One SSE request. A chunk of k characters after a gap g adds g once and 0 k-1 times to
    the inter-character gaps (the first chunk's g is the TTFT instead)."""
    reply = Reply()
    summary: dict[str, Any] | None = None
    last = t0 = time.perf_counter()
    try:
        async with aconnect_sse(client, "POST", "/generate", json=payload) as es:
            if es.response.status_code != 200:
                await es.response.aread()
                reply.error = f"HTTP {es.response.status_code}: {es.response.text[:200]}"
            else:
                async for ev in es.aiter_sse():
                    now = time.perf_counter()
                    if ev.event == "message":
                        k = len(json.loads(ev.data)["text"])
                        if not k:
                            continue
                        if reply.ttft_s is None:
                            reply.ttft_s = now - t0
                        else:
                            reply.gaps.append(now - last)
                        reply.gaps.extend([0.0] * (k - 1))
                        reply.chars += k
                        last = now
                    elif ev.event == "error":
                        reply.error = f"error event: {ev.data[:200]}"
                    elif ev.event == "done":
                        summary = json.loads(ev.data)
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: a malformed event
        reply.error = f"{type(exc).__name__}: {exc}"
    reply.e2e_s = time.perf_counter() - t0
    check_summary(reply, summary, payload["max_new_chars"])
    return reply


async def post_one(client: httpx.AsyncClient, payload: dict[str, Any]) -> Reply:
    reply = Reply()
    summary: dict[str, Any] | None = None
    t0 = time.perf_counter()
    try:
        r = await client.post("/generate", json=payload)
        if r.status_code == 200:
            summary = r.json()
            reply.chars = len(summary["text"])
        else:
            reply.error = f"HTTP {r.status_code}: {r.text[:200]}"
    except (httpx.HTTPError, ValueError) as exc:
        reply.error = f"{type(exc).__name__}: {exc}"
    reply.e2e_s = time.perf_counter() - t0
    check_summary(reply, summary, payload["max_new_chars"])
    return reply


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name: value summed over labels}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    r = await client.get("/metrics")
    return parse_metrics(r.text) if r.status_code == 200 else {}


@dataclass
class HttpResult:
    mode: str  # stream | json
    concurrency: int
    rounds: int  # the most requests one closed-loop client sent
    requests: int
    generated_chars: int
    wall_s: float
    chars_per_s: float
    errors: int
    error_examples: list[str]
    ttft_ms: dict[str, Any] | None  # request sent -> first character received (stream only)
    itl_ms: dict[str, Any] | None  # every gap between received characters, pooled
    e2e_ms: dict[str, Any]  # request sent -> reply complete
    peak_rss_mb: float | None  # server, sampled during this level
    server_cpu_s: float  # server process CPU time (all threads) during this level
    client_cpu_s: float  # this process (the clients) during this level
    steps: int  # from the server's /metrics
    mean_batch: float
    step_ms: float
    onnxruntime_share: float


async def http_level(client: httpx.AsyncClient, server: Server, sampler: RssSampler,
                     cfg: Config, model: str, chars: list[str], n: int, stream: bool
                     ) -> HttpResult:
    one = stream_one if stream else post_one

    async def burst(first: int, new_chars: int) -> list[Reply]:
        texts = seed_texts(chars, n, cfg.seed_chars, first)
        return list(await asyncio.gather(*(
            one(client, body(model, t, first + i, new_chars, stream))
            for i, t in enumerate(texts))))

    await burst(10**6, min(WARMUP_CHARS, cfg.new_chars))
    m0 = await scrape(client)
    sampler.sample()
    cpu0 = server.ps.cpu_times()
    own0 = time.process_time()
    # Closed loop, as serving benchmarks run a fixed concurrency: n clients each send their
    # next request as soon as the last one ends, until min_time has passed (one request each
    # at least). Waves of n that wait for their slowest member would leave rows idle.
    started = time.perf_counter()

    async def client_loop(i: int) -> list[Reply]:
        mine: list[Reply] = []
        while not mine or (len(mine) < MAX_ROUNDS
                           and time.perf_counter() - started < cfg.min_time):
            k = i + n * len(mine)
            text = seed_texts(chars, 1, cfg.seed_chars, k)[0]
            mine.append(await one(client, body(model, text, k, cfg.new_chars, stream)))
        return mine

    per_client = await asyncio.gather(*(client_loop(i) for i in range(n)))
    wall = time.perf_counter() - started
    replies = [r for mine in per_client for r in mine]
    rounds = max(len(mine) for mine in per_client)
    sampler.sample()
    ended = time.perf_counter()
    own = time.process_time() - own0
    cpu1 = server.ps.cpu_times()
    m1 = await scrape(client)

    def delta(key: str) -> float:
        return m1.get(key, 0.0) - m0.get(key, 0.0)

    steps = int(delta("charlstm_step_seconds_count"))
    step_s = delta("charlstm_step_seconds_sum")
    errors = [r.error for r in replies if r.error]
    total = sum(r.chars for r in replies)
    return HttpResult(
        mode="stream" if stream else "json", concurrency=n, rounds=rounds,
        requests=len(replies), generated_chars=total, wall_s=round(wall, 4),
        chars_per_s=round(total / wall, 1), errors=len(errors),
        error_examples=sorted(set(errors))[:5],
        ttft_ms=latency_ms([r.ttft_s for r in replies if r.ttft_s is not None])
        if stream else None,
        itl_ms=latency_ms([g for r in replies for g in r.gaps]) if stream else None,
        e2e_ms=latency_ms([r.e2e_s for r in replies if not r.error]),
        peak_rss_mb=sampler.peak_mb(started, ended),
        server_cpu_s=round(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 3),
        client_cpu_s=round(own, 3), steps=steps,
        mean_batch=round(delta("charlstm_batch_size_sum") / max(steps, 1), 2),
        step_ms=round(step_s / max(steps, 1) * 1e3, 4),
        onnxruntime_share=round((step_s + delta("charlstm_prefill_seconds_sum")) / wall, 3),
    )


async def measure_http(cfg: Config, model: str, chars: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp, \
            serve(cfg, Path(tmp)) as server, RssSampler(server.ps) as sampler:
        sampler.sample()
        idle = sampler.peak_mb()
        limits = httpx.Limits(max_connections=cfg.capacity,
                              max_keepalive_connections=cfg.capacity)
        async with httpx.AsyncClient(base_url=server.url, timeout=TIME_LIMIT_S, limits=limits,
                                     trust_env=False) as client:
            info = (await client.get(f"/models/{model}")).json()
            levels: dict[str, list[HttpResult]] = {"stream": [], "json": []}
            for stream in (True, False):
                for n in cfg.concurrency:
                    res = await http_level(client, server, sampler, cfg, model, chars, n,
                                           stream)
                    levels[res.mode].append(res)
                    log(f"http {res.mode:6s} concurrency {n:5d}: {res.chars_per_s:12,.0f} "
                        f"chars/s, {res.errors} errors")
        server_info = {
            "provider": info.get("provider"), "rss_idle_mb": idle,
            "rss_peak_sampled_mb": sampler.peak_mb(), "rss_peak_hwm_mb": server.peak_rss_mb(),
            "rss_samples": len(sampler.samples),
        }
    return {"stream": levels["stream"], "json": levels["json"], "server": server_info}


# --- 4. the reference notebook loop ----------------------------------------------------------
def notebook_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The Keras text-generation notebooks' loop, on a same-sized model with random weights."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import tensorflow as tf

    chars: list[str] = spec["chars"]
    window, units, layers = spec["window"], spec["units"], spec["layers"]
    index = {c: i for i, c in enumerate(chars)}
    v = len(chars)
    model = keras.Sequential(
        [keras.Input((window, v))]
        + [keras.layers.LSTM(units, return_sequences=i < layers - 1) for i in range(layers)]
        + [keras.layers.Dense(v, activation="softmax")])
    np.random.seed(0)

    def sample(preds: npt.NDArray[Any], temperature: float) -> int:
        # Verbatim from the notebooks, multinomial draw included.
        p = np.log(np.asarray(preds).astype("float64")) / temperature
        p = np.exp(p) / np.sum(np.exp(p))
        return int(np.argmax(np.random.multinomial(1, p, 1)))

    def next_char(sentence: str) -> str:
        x = np.zeros((1, window, v))
        for t, ch in enumerate(sentence):
            x[0, t, index[ch]] = 1.0
        return chars[sample(model.predict(x, verbose=0)[0], TEMPERATURE)]

    sentence = seed_texts(chars, 1, window, first=0)[0]
    for _ in range(2):  # the first predict traces the graph; the notebooks pay it once too
        next_char(sentence)
    t0 = time.perf_counter()
    for _ in range(spec["new_chars"]):
        sentence = sentence[1:] + next_char(sentence)
    wall = time.perf_counter() - t0
    return {
        "generated_chars": spec["new_chars"], "wall_s": round(wall, 4),
        "chars_per_s": round(spec["new_chars"] / wall, 2),
        "ms_per_char": round(wall / spec["new_chars"] * 1e3, 2),
        "window": window, "units": units, "layers": layers, "vocab": v,
        "parameters": int(model.count_params()), "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf_devices": [d.device_type for d in tf.config.list_physical_devices()],
    }


def measure_notebook(cfg: Config, model: OnnxModel) -> dict[str, Any]:
    arch = model.meta.architecture
    spec = {"chars": model.vocab.chars, "window": NOTEBOOK_WINDOW, "units": arch.units,
            "layers": arch.layers, "new_chars": cfg.notebook_chars}
    if cfg.notebook_chars <= 0:  # e.g. a GPU host without TensorFlow
        log("notebook loop: skipped (--notebook-chars 0)")
        return {**spec, "skipped": True, "chars_per_s": None, "ms_per_char": None}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cfg.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # keep TensorFlow on the device the rest used
    res = subprocess.run([sys.executable, "-m", "bench.decode", "--notebook-worker",
                          json.dumps(spec)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"notebook loop failed ({res.returncode}):\n{res.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    log(f"notebook loop: {out['chars_per_s']:,.1f} chars/s")
    return out


# --- report --------------------------------------------------------------------------------
def by_level(rows: list[Any], key: str) -> dict[int, Any]:
    return {getattr(r, key): r for r in rows}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(cfg: Config, raw: list[RawResult], engine: list[EngineResult],
           http: dict[str, Any], notebook: dict[str, Any]) -> dict[str, Any]:
    rb, eb = by_level(raw, "batch"), by_level(engine, "concurrency")
    sb, jb = by_level(http["stream"], "concurrency"), by_level(http["json"], "concurrency")
    levels = []
    for n in cfg.concurrency:
        base = rb[n].chars_per_s
        levels.append({
            "concurrency": n, "raw_chars_per_s": base,
            "engine_over_raw": ratio(eb[n].chars_per_s, base),
            "http_stream_over_raw": ratio(sb[n].chars_per_s, base),
            "http_json_over_raw": ratio(jb[n].chars_per_s, base),
        })
    single = sb[1].chars_per_s if 1 in sb else None
    return {"by_concurrency": levels,
            "service_single_stream_over_notebook": ratio(single, notebook["chars_per_s"])}


def targets(ratio_table: dict[str, Any], http: dict[str, Any]) -> list[dict[str, Any]]:
    at = {r["concurrency"]: r for r in ratio_table["by_concurrency"]}
    sb = by_level(http["stream"], "concurrency")
    n = TARGET_CONCURRENCY

    def check(name: str, value: float | None, goal: float, unit: str, higher: bool
              ) -> dict[str, Any]:
        if value is None:
            status = "NOT MEASURED"
        else:
            status = "PASS" if (value >= goal if higher else value <= goal) else "MISS"
        return {"target": name, "goal": goal, "value": value, "unit": unit, "status": status}

    return [
        check(f"engine >= 90% of raw at concurrency {n}",
              at[n]["engine_over_raw"] if n in at else None, 0.9, "ratio", True),
        check(f"HTTP streaming >= 60% of raw at concurrency {n}",
              at[n]["http_stream_over_raw"] if n in at else None, 0.6, "ratio", True),
        check("single stream >= 3,000 chars/s over HTTP",
              sb[1].chars_per_s if 1 in sb else None, 3000.0, "chars/s", True),
        check("TTFT p50 <= 20 ms at concurrency 1",
              sb[1].ttft_ms["p50"] if 1 in sb else None, 20.0, "ms", False),
    ]


def pct(d: dict[str, Any] | None, key: str) -> float | None:
    return None if d is None else d.get(key)


def markdown(report: dict[str, Any]) -> str:
    m, s = report["meta"], report["settings"]
    raw = report["raw"]
    rb = {r["batch"]: r for r in raw}
    eb = {r["concurrency"]: r for r in report["engine"]}
    sb = {r["concurrency"]: r for r in report["http_stream"]}
    jb = {r["concurrency"]: r for r in report["http_json"]}
    nb, srv, rt = report["notebook"], report["server"], report["ratios"]
    git = m["git"]
    lines = [
        f"# Decode benchmark: {Path(s['model']).name} on {m['hostname']}, "
        f"{m['started'][:10]}",
        "",
        f"{m['cpu']}, {m['cpu_count_logical']} logical CPUs ({m['cpu_affinity']} usable), "
        f"{m['memory_gb']} GB; load average {m['loadavg_start']} at start, "
        f"{m['loadavg_end']} at end. Provider {m['provider']}"
        + (f" on {m['gpu']}" if m["gpu"] and m["provider"] == "CUDAExecutionProvider" else "")
        + f"; Python {m['python']}, onnxruntime {m['onnxruntime']}; commit "
        f"{(git['commit'] or '?')[:12]}{' (dirty)' if git['dirty'] else ''}.",
        "",
        f"Model `{s['model']}`. Each request: {s['seed_chars']}-character seed, "
        f"{s['new_chars']} new characters, "
        f"temperature {TEMPERATURE}; onnxruntime intra-op threads {s['threads']}"
        + ("; **quick mode** (numbers are only a smoke test)" if s["quick"] else "") + ".",
        "",
        "## Targets",
        "",
        md_table(["target", "measured", "status"],
                 [[t["target"], f"{cell(t['value'])} {t['unit']}" if t["value"] is not None
                   else None, f"**{t['status']}**"] for t in report["targets"]]),
        "",
        "## Throughput (generated chars/s, all requests together)",
        "",
        md_table(["concurrency", "raw (batch = concurrency)", "engine", "HTTP stream",
                  "HTTP JSON", "engine / raw", "stream / raw", "JSON / raw"],
                 [[r["concurrency"], r["raw_chars_per_s"], eb[r["concurrency"]]["chars_per_s"],
                   sb[r["concurrency"]]["chars_per_s"], jb[r["concurrency"]]["chars_per_s"],
                   r["engine_over_raw"], r["http_stream_over_raw"], r["http_json_over_raw"]]
                  for r in rt["by_concurrency"]]),
        "",
        (f"Reference notebook loop (Keras `model.predict` per character, batch 1, "
         f"{nb['layers']} x LSTM({nb['units']}), {nb['window']}-character one-hot window): "
         f"**{nb['chars_per_s']:,.1f} chars/s** ({nb['ms_per_char']} ms per character). "
         f"Service single stream / notebook loop: "
         f"**{rt['service_single_stream_over_notebook'] or 0:,.0f}x**.")
        if nb["chars_per_s"] else "Reference notebook loop: not measured in this run.",
        "",
        "## Raw ceiling by batch size",
        "",
        md_table(["batch", "chars/s", "decode-only chars/s", "prefill ms", "onnxruntime ms/step",
                  "sampling ms/step"],
                 [[r["batch"], r["chars_per_s"], r["decode_chars_per_s"], r["prefill_ms"],
                   r["step_ms"], r["sample_ms"]] for r in raw]),
        "",
        "## Latency, ms",
        "",
        md_table(["concurrency", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "E2E p50",
                  "E2E p99", "JSON E2E p50", "JSON E2E p99", "engine E2E p50", "errors"],
                 [[n, pct(sb[n]["ttft_ms"], "p50"), pct(sb[n]["ttft_ms"], "p99"),
                   pct(sb[n]["itl_ms"], "p50"), pct(sb[n]["itl_ms"], "p99"),
                   pct(sb[n]["e2e_ms"], "p50"), pct(sb[n]["e2e_ms"], "p99"),
                   pct(jb[n]["e2e_ms"], "p50"), pct(jb[n]["e2e_ms"], "p99"),
                   pct(eb[n]["e2e_ms"], "p50"),
                   f"{sb[n]['errors']} / {jb[n]['errors']} / {eb[n]['errors']}"]
                  for n in sorted(sb)]),
        "",
        "TTFT, ITL and E2E from the streaming clients; errors: stream / JSON / engine.",
        "",
        "## Where the time goes (per decode step of the whole batch)",
        "",
        md_table(["concurrency", "raw onnxruntime ms", "raw sampling ms", "engine onnxruntime ms",
                  "engine other ms", "engine onnxruntime share", "server onnxruntime ms",
                  "server mean batch", "server onnxruntime share (stream)",
                  "server CPU s (stream)", "client CPU s (stream)"],
                 [[n, rb[n]["step_ms"], rb[n]["sample_ms"], eb[n]["step_ms"],
                   eb[n]["other_ms_per_step"], eb[n]["onnxruntime_share"], sb[n]["step_ms"],
                   sb[n]["mean_batch"], sb[n]["onnxruntime_share"], sb[n]["server_cpu_s"],
                   sb[n]["client_cpu_s"]] for n in sorted(sb)]),
        "",
        "## Server memory (RSS)",
        "",
        f"Idle after start-up {srv['rss_idle_mb']} MB; peak during the HTTP runs "
        f"{srv['rss_peak_sampled_mb']} MB sampled every 50 ms, {srv['rss_peak_hwm_mb']} MB "
        "by the kernel's high-water mark.",
        "",
    ]
    return "\n".join(lines)


def level_axis(ax: Any, levels: list[int], label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.minorticks_off()
    ax.set_xlabel(label)
    ax.grid(True, which="major", alpha=0.3)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    raw = report["raw"]
    ax1.plot([r["batch"] for r in raw], [r["chars_per_s"] for r in raw], "k--o",
             label="raw onnxruntime (x = batch)")
    for key, label, style in (("engine", "engine in-process", "-s"),
                              ("http_stream", "HTTP streaming", "-o"),
                              ("http_json", "HTTP JSON", "-^")):
        rows = report[key]
        ax1.plot([r["concurrency"] for r in rows], [r["chars_per_s"] for r in rows], style,
                 label=label)
    if report["notebook"]["chars_per_s"]:
        ax1.axhline(report["notebook"]["chars_per_s"], color="grey", linestyle=":",
                    label="notebook loop (batch 1)")
    ax1.set(yscale="log", ylabel="generated chars/s (all requests)", title="Throughput")
    level_axis(ax1, sorted({r["batch"] for r in raw}), "concurrent requests (raw: batch size)")
    ax1.legend(fontsize=8)

    stream = report["http_stream"]
    xs = [r["concurrency"] for r in stream]
    for key, name in (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        for q, style in (("p50", "-o"), ("p99", "--^")):
            ax2.plot(xs, [r[key][q] for r in stream], style, label=f"{name} {q}")
    # symlog: an ITL p50 of 0 (several characters per chunk) stays on the chart.
    ax2.set_yscale("symlog", linthresh=0.1)
    ax2.set(ylabel="ms", title="HTTP streaming latency percentiles")
    level_axis(ax2, xs, "concurrent streams")
    ax2.legend(fontsize=8)
    s = report["settings"]
    fig.suptitle(f"{Path(s['model']).name}: {s['seed_chars']}-char seed, {s['new_chars']} new "
                 f"chars, {report['meta']['provider']}, {report['meta']['hostname']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- entry point ---------------------------------------------------------------------------
def run(cfg: Config) -> dict[str, Any]:
    meta = machine_facts()
    meta["loadavg_start"] = load_average()
    model = load_model(cfg.model, RuntimeOptions(device=cfg.device,
                                                 intra_op_threads=cfg.threads))
    meta["provider"] = model.provider
    log(f"{model.name}: {model.meta.architecture.parameters:,} parameters, vocabulary "
        f"{len(model.vocab)}, on {model.provider}")
    raw = []
    for b in cfg.batches:
        raw.append(measure_raw(model, cfg, b))
        log(f"raw     batch       {b:5d}: {raw[-1].chars_per_s:12,.0f} chars/s")
    engine = asyncio.run(measure_engine(model, cfg))
    http = asyncio.run(measure_http(cfg, model.name, model.vocab.chars))
    notebook = measure_notebook(cfg, model)  # last: TensorFlow never overlaps the rest
    meta["loadavg_end"] = load_average()
    ratio_table = ratios(cfg, raw, engine, http, notebook)
    settings = {**{k: shown(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                "temperature": TEMPERATURE, "capacity": cfg.capacity}
    return {
        "meta": meta, "settings": settings, "notebook": notebook,
        "raw": [asdict(r) for r in raw], "engine": [asdict(r) for r in engine],
        "http_stream": [asdict(r) for r in http["stream"]],
        "http_json": [asdict(r) for r in http["json"]],
        "server": http["server"], "ratios": ratio_table,
        "targets": targets(ratio_table, http),
    }






def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.decode", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "shakespeare",
                   help="exported model folder")
    p.add_argument("--seed-chars", type=int, help=f"seed length (default {DEFAULTS['seed_chars']})")
    p.add_argument("--new-chars", type=int,
                   help=f"characters generated per request (default {DEFAULTS['new_chars']})")
    p.add_argument("--concurrency", help="concurrent requests for the engine and HTTP runs "
                   f"(default {DEFAULTS['concurrency']})")
    p.add_argument("--batches", help="raw onnxruntime batch sizes; every concurrency level is "
                   f"added so each has a ceiling to compare with (default {DEFAULTS['batches']})")
    p.add_argument("--threads", type=int,
                   default=Settings.model_fields["intra_op_threads"].default,
                   help="onnxruntime intra-op threads (0 = all cores), here and in the server")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                   help="folder for the .json, .md and .png results")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny settings for a smoke test in seconds: {QUICK}")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="onnxruntime provider, as CHARLSTM_DEVICE")
    p.add_argument("--notebook-chars", type=int, help="characters for the notebook loop "
                   f"(default {DEFAULTS['notebook_chars']}; it runs at about 10 chars/s)")
    p.add_argument("--min-time", type=float, help="repeat each level until this many seconds "
                   "have passed, for steadier small-batch figures "
                   f"(default {DEFAULTS['min_time']})")
    p.add_argument("--notebook-worker", help=argparse.SUPPRESS)  # internal: the TF subprocess
    return p.parse_args(argv)


def config(args: argparse.Namespace) -> Config:
    base = QUICK if args.quick else DEFAULTS

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return base[name] if value is None else value

    concurrency = int_list(pick("concurrency"))
    for name in ("seed_chars", "new_chars"):
        if pick(name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if pick("notebook_chars") < 0:
        raise SystemExit("--notebook-chars must be >= 0 (0 skips the notebook loop)")
    if not (args.model / "model.json").is_file():
        raise SystemExit(f"{args.model}: not a model folder (no model.json)")
    return Config(
        model=args.model, seed_chars=pick("seed_chars"), new_chars=pick("new_chars"),
        concurrency=concurrency,
        batches=sorted(set(int_list(pick("batches"))) | set(concurrency)),
        threads=args.threads, out=args.out, quick=args.quick, device=args.device,
        notebook_chars=pick("notebook_chars"), min_time=pick("min_time"),
    )


def raise_open_files_limit(needed: int) -> None:
    """Each concurrent client holds a socket; 1024 streams exceed the usual soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256 if hard == resource.RLIM_INFINITY else min(hard, needed + 256)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.notebook_worker:
        print(json.dumps(notebook_worker(json.loads(args.notebook_worker))))
        return 0
    cfg = config(args)
    raise_open_files_limit(cfg.capacity)
    try:
        report = run(cfg)
    except ArtifactError as exc:  # a bad model folder, or --device cuda without a GPU build
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json_path, md_path = write_results(cfg.out, "decode", cfg.quick, report, markdown(report))
    png_path = md_path.with_name(md_path.name[:-len(".md")] + ".png")
    plot(report, png_path)
    log(f"wrote {json_path}, {md_path.name}, {png_path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

