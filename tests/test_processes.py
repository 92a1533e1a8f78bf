"""The process layout of `python -m app` (issue 12): engine processes, several HTTP workers,
and what happens when a process dies or the service is told to stop."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from httpx_sse import connect_sse

from app.artifact import ArtifactError, read_metadata
from app.runtime import serving_variant
from tests.conftest import ROOT, Server, free_port, start_server, stop_server
from tests.test_api import metric

pytestmark = pytest.mark.slow  # real server processes: the process layout itself


@pytest.fixture(scope="module")
def two_workers(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Server]:
    srv = start_server(tiny_models, tmp_path_factory.mktemp("procs") / "server.log",
                       http_workers="2", max_batch="64")
    yield srv
    stop_server(srv)


def engine_pid(srv: Server, model: str = "tiny") -> int:
    pids = re.findall(rf"engine for {model} ready on \S+ \(pid (\d+)", srv.log())
    return int(pids[-1])


def stream_events(url: str, body: dict[str, object]) -> list[tuple[str, dict[str, object]]]:
    with httpx.Client(base_url=url, timeout=60) as c, connect_sse(
            c, "POST", "/generate", json={**body, "stream": True}) as es:
        return [(ev.event, ev.json()) for ev in es.iter_sse()]


def test_seeded_streams_are_identical_whichever_worker_serves_them(two_workers: Server
                                                                    ) -> None:
    bodies = [{"seed_text": "First Citizen:\n", "temperature": 1.0, "max_new_chars": 150,
               "seed": 700 + i} for i in range(32)]
    with two_workers.client() as c:
        solo = [c.post("/generate", json=b).json()["text"] for b in bodies[:8]]
    with ThreadPoolExecutor(32) as pool:
        crowd = list(pool.map(lambda b: "".join(
            str(d.get("text", "")) for e, d in stream_events(two_workers.url, b)
            if e == "message"), bodies))
    assert crowd[:8] == solo
    # Both workers served: each logs its own access lines.
    pids = set(re.findall(r"Started server process \[(\d+)\]", two_workers.log()))
    assert len(pids) == 2


def test_metrics_show_every_process(two_workers: Server) -> None:
    with two_workers.client() as c:
        before = metric(c.get("/metrics").text, "charlstm_generated_chars_total", model="tiny")
        for _ in range(6):  # spread over both workers by the kernel's accept
            with httpx.Client(base_url=two_workers.url, timeout=30) as fresh:
                fresh.post("/generate", json={"seed_text": "A", "max_new_chars": 10})
        texts = []
        for _ in range(4):  # whichever worker answers /metrics sees the engine's counts
            with httpx.Client(base_url=two_workers.url, timeout=30) as fresh:
                texts.append(fresh.get("/metrics").text)
    for text in texts:
        assert metric(text, "charlstm_generated_chars_total", model="tiny") == before + 60
        assert metric(text, "charlstm_active_rows", model="tiny") == 0


def test_killing_the_engine_mid_stream_ends_streams_with_an_error_and_it_comes_back(
        tiny_models: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_models, tmp_path / "server.log", http_workers="2")
    try:
        events: list[list[tuple[str, dict[str, object]]]] = [[] for _ in range(4)]
        started = threading.Barrier(5, timeout=60)

        def read(i: int) -> None:
            # Seeds of their own: none is cached whole, so each has a prefill to report.
            with httpx.Client(base_url=srv.url, timeout=60) as c, connect_sse(
                    c, "POST", "/generate", json={"seed_text": "A" * (i + 1),
                                                  "max_new_chars": 5000, "stream": True}) as es:
                for n, ev in enumerate(es.iter_sse()):
                    events[i].append((ev.event, ev.json()))
                    if n == 0:
                        started.wait()

        threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait()
        old = engine_pid(srv)
        psutil.Process(old).kill()
        killed_at = time.monotonic()
        for t in threads:
            t.join(10)
        ended_in = time.monotonic() - killed_at
        assert not any(t.is_alive() for t in threads), "a stream hung after the engine died"
        for evs in events:
            assert [e for e, _ in evs[-2:]] == ["error", "done"]
            assert "engine of model 'tiny' stopped" in str(evs[-2][1])
            done = evs[-1][1]
            assert done["finish_reason"] == "error"
            # The timings the engine measured before it died, not zeros.
            timings = done["timings"]
            assert isinstance(timings, dict)
            assert timings["prefill_ms"] > 0
            assert timings["decode_ms"] > 0
            assert timings["first_char_ms"] < timings["total_ms"]
            assert isinstance(done["usage"], dict)
            assert done["usage"]["generated_chars"] == len("".join(
                str(d.get("text", "")) for e, d in evs if e == "message"))
        assert ended_in < 5
        # The supervisor restarts it; the service is ready and serving again.
        deadline = time.monotonic() + 60
        with srv.client() as c:
            while time.monotonic() < deadline:
                if c.get("/ready").status_code == 200 and engine_pid(srv) != old:
                    break
                time.sleep(0.1)
            reply = c.post("/generate", json={"seed_text": "A", "max_new_chars": 20})
        assert engine_pid(srv) != old
        assert reply.status_code == 200
        assert reply.json()["finish_reason"] == "length"
        assert "the engine of tiny died" in srv.log()
    finally:
        stop_server(srv)


def test_an_engine_that_keeps_dying_stops_the_service_with_exit_code_1(
        tiny_models: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_models, tmp_path / "server.log")
    try:
        for _ in range(6):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and srv.proc.poll() is None:
                pid = engine_pid(srv)
                if psutil.pid_exists(pid):
                    psutil.Process(pid).kill()
                    break
                time.sleep(0.05)
            time.sleep(0.3)
        assert srv.proc.wait(60) == 1
    finally:
        stop_server(srv)
    assert "stopping the service" in srv.log()


def test_sigterm_stops_every_process_and_exits_0(tiny_models: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_models, tmp_path / "server.log", http_workers="2", drain_s="5")
    children = psutil.Process(srv.proc.pid).children(recursive=True)
    assert len(children) >= 3  # an engine and two workers (and the spawn tracker)
    result: dict[str, object] = {}
    reader = threading.Thread(target=lambda: result.update(
        events=stream_events(srv.url, {"seed_text": "A", "max_new_chars": 300})))
    reader.start()
    time.sleep(0.3)
    srv.proc.send_signal(signal.SIGTERM)
    reader.join(60)
    assert srv.proc.wait(60) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {alive}"
    events = result["events"]
    assert isinstance(events, list)
    assert events[-1][0] == "done"
    assert "Traceback" not in srv.log()


def test_help_prints_the_settings_and_starts_nothing() -> None:
    res = subprocess.run([sys.executable, "-m", "app", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0
    assert "CHARLSTM_HTTP_WORKERS" in res.stdout
    assert "CHARLSTM_MAX_WAIT_S" in res.stdout


def test_uvicorn_app_main_app_serves_everything_in_one_process(tiny_models: Path,
                                                             tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "uvicorn.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port)], cwd=ROOT,
        env={**os.environ, "CHARLSTM_MODELS_DIR": str(tiny_models),
             "CHARLSTM_DEFAULT_MODEL": "tiny"}, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        reply = httpx.post(f"{url}/generate", json={"seed_text": "A", "max_new_chars": 10},
                           timeout=30)
        assert reply.status_code == 200
        assert len(reply.json()["text"]) == 10
        assert psutil.Process(proc.pid).children() == []  # one process, engines on threads
    finally:
        proc.terminate()
        proc.wait(30)


def test_bundled_models_serve_a_batch_invariant_graph_and_int8_only_on_request(
        tmp_path: Path) -> None:
    """`auto` must not break the seed promise (the same text under any load): the bundled int8
    variants quantize activations over the whole batch, so the CPU serves model.onnx unless
    CHARLSTM_VARIANT=int8 asks for the variant."""
    for name in ("shakespeare", "nietzsche"):
        meta = read_metadata(ROOT / "models" / name)
        int8 = next(v for v in meta.variants if v.name == "int8")
        assert int8.validation.loss_nats <= int8.validation.reference_loss_nats + 0.01
        assert int8.batch_invariant is False
        assert serving_variant(meta, "cpu", "auto") is None
        assert serving_variant(meta, "cpu", "int8") == "int8"
        assert serving_variant(meta.model_copy(update={"variants": [
            int8.model_copy(update={"batch_invariant": True})]}), "cpu", "auto") == "int8"
    for variant, graph in (("auto", "model.onnx"), ("int8", "model.int8.onnx")):
        srv = start_server(ROOT / "models", tmp_path / f"{variant}.log", default="shakespeare",
                           variant=variant)
        try:
            with srv.client() as c:
                info = c.get("/models/shakespeare").json()
                reply = c.post("/generate", json={"seed_text": "ROMEO:", "max_new_chars": 50})
        finally:
            stop_server(srv)
        assert info["graph"] == graph
        assert reply.json()["usage"]["generated_chars"] == 50


def test_a_model_without_variants_serves_model_onnx(tiny_models: Path) -> None:
    meta = read_metadata(tiny_models / "tiny")
    assert serving_variant(meta, "cpu", "auto") is None
    with pytest.raises(ArtifactError, match="lists no int8 variant"):
        serving_variant(meta, "cpu", "int8")


def test_killing_the_supervisor_takes_every_process_with_it(tiny_models: Path,
                                                            tmp_path: Path) -> None:
    srv = start_server(tiny_models, tmp_path / "server.log", http_workers="2")
    children = psutil.Process(srv.proc.pid).children(recursive=True)
    try:
        srv.proc.kill()  # SIGKILL: the supervisor cannot tell anyone
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running without a supervisor: {alive}"
    finally:
        stop_server(srv)


def test_an_engine_paused_for_seconds_loses_no_request(tiny_models: Path,
                                                        tmp_path: Path) -> None:
    """A CPU quota, a swap storm or a stop signal pauses an engine: its requests wait for it
    (issue 26: one second of silence used to fail all of them)."""
    srv = start_server(tiny_models, tmp_path / "server.log")
    try:
        texts: list[str] = ["" for _ in range(16)]
        dones: list[dict[str, object]] = [{} for _ in range(16)]
        started = threading.Barrier(17, timeout=60)

        def read(i: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as c, connect_sse(
                    c, "POST", "/generate", json={"seed_text": "A", "max_new_chars": 3000,
                                                  "seed": i, "stream": True}) as es:
                for n, ev in enumerate(es.iter_sse()):
                    if ev.event == "message":
                        texts[i] += ev.json()["text"]
                    elif ev.event == "done":
                        dones[i] = ev.json()
                    if n == 0:
                        started.wait()

        threads = [threading.Thread(target=read, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        started.wait()
        engine = psutil.Process(engine_pid(srv))
        engine.suspend()
        time.sleep(3.0)  # three times the silence that used to count as death
        engine.resume()
        for t in threads:
            t.join(60)
        assert [d.get("finish_reason") for d in dones] == ["length"] * 16
        assert [len(t) for t in texts] == [3000] * 16
        assert engine.is_running()  # the same process: it was never declared dead
        assert "stopped" not in srv.log()
    finally:
        stop_server(srv)


def test_a_hung_engine_is_restarted_and_never_blocks_another_model(tiny_models: Path,
                                                                   tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models / "tiny", models / "tiny")
    # Another folder name than model.json's "name": served (and continued) as "other".
    shutil.copytree(tiny_models / "tiny", models / "other")
    srv = start_server(models, tmp_path / "server.log", engine_hung_s="3")
    try:
        with srv.client() as c:
            first = c.post("/generate", json={"model": "other", "seed_text": "A", "seed": 3,
                                              "max_new_chars": 30, "resumable": True}).json()
            # The handle names its model: no `model` needed to continue it.
            go_on = c.post("/generate", json={"max_new_chars": 30,
                                              "continuation": first["continuation"]})
            assert go_on.status_code == 200, go_on.text
            assert go_on.json()["model"] == "other"
            hung = engine_pid(srv, "other")
            psutil.Process(hung).suspend()  # SIGSTOP: alive, silent
            time.sleep(1.5)
            # Slow is not dead: still ready, and the other model serves meanwhile.
            assert c.get("/ready").status_code == 200
            ok = c.post("/generate", json={"model": "tiny", "max_new_chars": 5})
            assert ok.status_code == 200, ok.text
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                    c.get("/ready").status_code != 200 or engine_pid(srv, "other") == hung):
                time.sleep(0.2)
            assert engine_pid(srv, "other") != hung
            again = c.post("/generate", json={"model": "other", "max_new_chars": 5})
        assert again.status_code == 200
        assert "stopped answering" in srv.log()
    finally:
        stop_server(srv)
