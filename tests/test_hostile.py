"""Issue 11's attacks, each reproduced against a real server: a killed engine, JSON clients
that vanish, a flood of long seeds, an overload far past capacity, a drain that runs out."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from httpx_sse import connect_sse

from app.decode import serving_decode_graphs
from app.engine.core import EngineCore
from app.runtime import RuntimeOptions, load_model
from tests.conftest import ROOT, Server, start_server, stop_server
from tests.test_api import metric
from tests.test_faults import inprocess  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.alone]  # load against real server processes


class EngineKilled(BaseException):
    """Escapes every `except Exception` in the engine: the worker dies outright."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_killed_engine_turns_ready_off_and_requests_get_503_not_a_hang(
        inprocess: tuple[str, Any]) -> None:  # noqa: F811
    url, app = inprocess
    engine = app.state.service.models["tiny"].engine
    events: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=url, timeout=30) as c, connect_sse(
                c, "POST", "/generate",
                json={"seed_text": "A", "max_new_chars": 5000, "stream": True}) as es:
            for ev in es.iter_sse():
                events.append(ev.event)
                started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)

    def die(*args: Any, **kwargs: Any) -> Any:
        raise EngineKilled

    core = engine.thread.core
    core.model.step = die  # prefill
    core.decode.steps.run = die  # decode (the exported model has a decode graph)
    killed_at = time.monotonic()
    with httpx.Client(base_url=url, timeout=5) as c:
        while c.get("/ready").status_code == 200:
            assert time.monotonic() - killed_at < 1.0, "/ready still 200 a second after"
            time.sleep(0.02)
        ready = c.get("/ready")
        t0 = time.monotonic()
        refused = c.post("/generate", json={"seed_text": "A", "max_new_chars": 5})
        refused_stream = c.post("/generate", json={"seed_text": "A", "stream": True})
        answered_in = time.monotonic() - t0
    reader.join(10)
    assert not reader.is_alive()
    assert "engine stopped" in ready.json()["error"]["message"]
    assert refused.status_code == 503
    assert refused_stream.status_code == 503
    assert answered_in < 1.0
    assert events[-2:] == ["error", "done"]


def test_two_hundred_vanishing_json_clients_leave_no_trace_and_free_their_rows(
        tiny_models: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_models, tmp_path / "server.log", max_batch="256")
    try:
        async def vanish(client: httpx.AsyncClient, i: int) -> None:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/generate", json={"seed_text": "A", "max_new_chars": 5000,
                                                     "seed": i},
                                  timeout=httpx.Timeout(0.05 + (i % 5) / 20, connect=10,
                                                        pool=60))

        async def go() -> None:
            async with httpx.AsyncClient(base_url=srv.url,
                                         limits=httpx.Limits(max_connections=50)) as client:
                await asyncio.gather(*(vanish(client, i) for i in range(200)))

        asyncio.run(go())
        gone_at = time.monotonic()
        with srv.client() as c:
            while metric(text := c.get("/metrics").text, "charlstm_active_rows",
                         model="tiny") > 0:
                assert time.monotonic() - gone_at < 1.0, "rows not freed within a second"
                time.sleep(0.02)
            assert metric(text, "charlstm_requests_total", model="tiny",
                          outcome="cancelled") >= 150
    finally:
        stop_server(srv)
    log = srv.log()
    assert "Traceback" not in log
    assert "Exception in ASGI application" not in log


def _flood(url: str, stop_at: float, counter: Any) -> None:
    """20 clients looping 4,000-character seeds with max_new_chars 1 (its own process, so
    the measuring client's GIL is not the one under load)."""
    seed = ("Now is the winter of our discontent made glorious summer by this sun of York; "
            * 60)[:4000]

    def loop() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.monotonic() < stop_at:
                if c.post("/generate", json={"seed_text": seed, "max_new_chars": 1}
                          ).status_code == 200:
                    with counter.get_lock():
                        counter.value += 1

    threads = [threading.Thread(target=loop) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# A running stream waits at most one prefill slice (256 characters, ~31 ms for
# models/shakespeare on a quiet 2-core CPU) plus one decode step between characters. The
# bound allows 6 slices as timed on this machine during the flood (its speed varies 3x
# under other load), at least 0.25 s; before slicing, every 4,000-character seed stalled
# streams for ~16 slices (450-650 ms when quiet).
MIN_GAP_BOUND_S = 0.25
SLICES_ALLOWED = 6


def slice_time_now() -> float:
    model = load_model(ROOT / "models" / "shakespeare", RuntimeOptions(device="cpu"))
    ids = np.zeros((1, 256), np.int32)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        model.step(ids, model.zero_states(1))
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


@pytest.fixture
def shakespeare(tmp_path: Path) -> Iterator[Server]:
    srv = start_server(ROOT / "models", tmp_path / "server.log", default="shakespeare")
    yield srv
    stop_server(srv)


def test_a_flood_of_long_seeds_leaves_running_streams_a_bounded_gap(
        shakespeare: Server) -> None:
    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("i", 0)
    flood = ctx.Process(target=_flood, args=(shakespeare.url, time.monotonic() + 60, counter))
    flood.start()
    try:
        deadline = time.monotonic() + 30
        while counter.value < 20 and time.monotonic() < deadline:  # the flood is running
            time.sleep(0.05)
        assert counter.value >= 20
        bound = max(MIN_GAP_BOUND_S, SLICES_ALLOWED * slice_time_now())
        before = counter.value
        gaps: list[float] = []
        text = ""
        with httpx.Client(base_url=shakespeare.url, timeout=60) as c, connect_sse(
                c, "POST", "/generate", json={"seed_text": "ROMEO:", "max_new_chars": 1200,
                                              "stream": True, "seed": 1}) as es:
            last = None
            for ev in es.iter_sse():
                now = time.perf_counter()
                if ev.event == "message":
                    text += json.loads(ev.data)["text"]
                    if last is not None:
                        gaps.append(now - last)
                last = now
        flooded = counter.value - before
    finally:
        flood.kill()
        flood.join(10)
    assert flooded >= 20, "the flood did not run alongside the stream"
    # Under load the workers coalesce several characters per event (and the decode graph
    # makes 8 per call), so count characters for completeness and events only for a
    # meaningful gap sample: 400 characters came in 9 events once the decode graph served.
    assert len(text) == 1200
    assert len(gaps) >= 10
    print(f"\nflood: largest gap {max(gaps) * 1e3:.0f} ms (bound {bound * 1e3:.0f} ms), "
          f"{flooded} long seeds alongside")
    assert max(gaps) < bound, f"largest gap {max(gaps):.3f} s with {flooded} long seeds"


def test_overload_admits_what_fits_the_wait_bound_and_retry_after_gets_the_rest_served(
        tiny_models: Path, tmp_path: Path) -> None:
    # All requests are alike, so rows free in waves of 64, one every T = 3,000 characters'
    # worth of decode calls (the server's: K = 8 per call with the exported decode graph).
    # With the bound at 1.4 T the first queued wave (wait T) is admitted and the next (2 T)
    # refused: a refusal is false only if the machine ran 1.4x faster than the engine
    # predicted. A bound at a whole number of waves would make every verdict a coin toss.
    model = load_model(tiny_models / "tiny", RuntimeOptions(device="cpu"))
    core = EngineCore(model, max_batch=64, decode=serving_decode_graphs(model, 8))
    core.policy.calibrate()
    max_wait = max(0.5, round(1.4 * core.policy.calls(3000) * core.policy.iteration_s, 2))
    srv = start_server(tiny_models, tmp_path / "server.log", max_batch="64",
                       max_wait_s=str(max_wait), max_queue="1000")
    first_try: list[dict[str, Any]] = []
    tries: list[int] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        for attempt in range(1, 31):
            sent = time.monotonic()
            r = await client.post("/generate", json={
                "seed_text": "A", "max_new_chars": 3000, "temperature": 1.0, "seed": i})
            if attempt == 1:
                first_try.append({"sent": sent, "status": r.status_code,
                                  "body": r.json(), "retry_after": r.headers.get("retry-after")})
            if r.status_code == 200:
                tries.append(attempt)
                return
            assert r.status_code == 429, r.text
            await asyncio.sleep(int(r.headers["retry-after"]))
        pytest.fail(f"request {i} never served")

    async def go() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120,
                                     limits=httpx.Limits(max_connections=600)) as client:
            await asyncio.gather(*(one(client, i) for i in range(600)))

    srv_url = srv.url
    try:
        asyncio.run(go())
        assert len(tries) == 600  # every request was served, after honouring Retry-After
        admitted = [t for t in first_try if t["status"] == 200]
        refused = [t for t in first_try if t["status"] == 429]
        assert refused, f"600 x 3,000 characters on 64 rows must overload a {max_wait} s bound"
        assert all(int(t["retry_after"]) >= 1 for t in refused)
        # Admitted requests waited within the bound. The prediction extrapolates the speed
        # measured at admission; this shared machine's speed can halve after it: slack.
        waits = [t["body"]["timings"]["queue_ms"] / 1e3 for t in admitted]
        assert max(waits) < max_wait * 2 + 1.0, f"an admitted request waited {max(waits):.1f} s"
        _report_refusals(srv_url, admitted, refused, waits, tries, max_wait)
    finally:
        stop_server(srv)


def _report_refusals(srv_url: str, admitted: list[dict[str, Any]],
                     refused: list[dict[str, Any]], waits: list[float], tries: list[int],
                     max_wait: float) -> None:
    # The engine judges each refusal afterwards: the row that request would have had (FIFO)
    # came within the bound -> false. A soft gate keeps that rate low.
    with httpx.Client(base_url=srv_url, timeout=10) as c:
        text = c.get("/metrics").text
    false = metric(text, "charlstm_refusals_total", model="tiny", verdict="false")
    justified = metric(text, "charlstm_refusals_total", model="tiny", verdict="justified")
    rate = false / max(false + justified, 1)
    print(f"\noverload (bound {max_wait} s): {len(admitted)} admitted at once, "
          f"{len(refused)} refused at first, "
          f"refusals judged {false + justified:.0f}, false-refusal rate {rate:.1%}, max "
          f"admitted wait {max(waits):.2f} s, mean tries {sum(tries) / len(tries):.2f}")
    assert false + justified > 0
    assert rate <= 0.25


def test_a_drain_that_runs_out_of_time_ends_every_stream_with_error_then_done(
        tmp_path: Path) -> None:
    # Streams far longer than the drain: none can finish in it, however fast the machine or
    # however late the last of them started (on a busy machine the first ones had seconds).
    srv = start_server(ROOT / "models", tmp_path / "server.log", default="shakespeare",
                       drain_s="1", max_new_chars="200000")
    results: list[list[str]] = [[] for _ in range(20)]
    started = threading.Barrier(21, timeout=60)

    def read(i: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c, connect_sse(
                c, "POST", "/generate",
                json={"seed_text": "ROMEO:", "max_new_chars": 5000, "stream": True,
                      "seed": i}) as es:
            for n, ev in enumerate(es.iter_sse()):
                results[i].append(ev.event)
                if n == 0:
                    started.wait()

    threads = [threading.Thread(target=read, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    started.wait()
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert srv.proc.wait(60) == 0
    for events in results:
        assert events[-2:] == ["error", "done"], events[-3:]
    log = srv.log()
    assert "Traceback" not in log
    assert "drain timed out" in log
