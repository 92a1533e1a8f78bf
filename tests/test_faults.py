"""Faults: SIGTERM drain, an onnxruntime error mid-batch, a JSON client that goes away."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from httpx_sse import connect_sse

from app.main import create_app
from app.settings import Settings
from tests.conftest import ROOT, free_port, start_server
from tests.test_api import metric


def read_stream(url: str, body: dict[str, object], out: dict[str, object]) -> None:
    text = ""
    with httpx.Client(base_url=url, timeout=60) as c, connect_sse(
            c, "POST", "/generate", json={**body, "stream": True}) as es:
        for ev in es.iter_sse():
            if ev.event == "message":
                text += ev.json()["text"]
                out["started"] = True
            elif ev.event == "done":
                out["done"] = ev.json()
    out["text"] = text


@pytest.mark.slow  # real server processes
def test_sigterm_drains_running_streams_and_refuses_new_ones(tmp_path: Path) -> None:
    srv = start_server(ROOT / "models", tmp_path / "server.log", default="shakespeare",
                       drain_s="30")
    results: list[dict[str, object]] = [{} for _ in range(3)]
    threads = [threading.Thread(target=read_stream, args=(srv.url, {
        "seed_text": "ROMEO:", "max_new_chars": 5000, "seed": i}, results[i]))
        for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while not all(r.get("started") for r in results) and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        refused = c.post("/generate", json={"seed_text": "A", "max_new_chars": 5})
        ready = c.get("/ready")
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "unavailable"
    assert refused.headers["retry-after"] == "1"
    assert ready.status_code == 503
    for t in threads:
        t.join(60)
    assert srv.proc.wait(60) == 0
    for r in results:
        done = r["done"]
        assert isinstance(done, dict)
        assert done["finish_reason"] == "length"
        assert len(str(r["text"])) == 5000
    log = srv.log()
    assert "draining" in log
    assert "Traceback" not in log


@pytest.fixture
def inprocess(tiny_models: Path) -> Iterator[tuple[str, object]]:
    """A real uvicorn server on a real port, in this process, so a test can reach the engine."""
    app = create_app(Settings(models_dir=tiny_models, default_model="tiny"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    yield url, app
    server.should_exit = True
    thread.join(10)


def test_injected_onnxruntime_error_sends_error_event_and_engine_keeps_serving(
        inprocess: tuple[str, object]) -> None:
    url, app = inprocess
    # The decode graph runs every decode step (exported models come with one); the step
    # graph's own failures are tested in test_engine.
    graph = app.state.service.models["tiny"].engine.thread.core.decode.steps  # type: ignore[attr-defined]
    calls = {"n": 0}
    real_run = graph.run

    def fail_on_the_50th_call(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 50:
            raise RuntimeError("injected onnxruntime failure at /secret/path")
        return real_run(*args, **kwargs)

    graph.run = fail_on_the_50th_call
    events: list[tuple[str, dict[str, object]]] = []
    with httpx.Client(base_url=url, timeout=30) as c, connect_sse(
            c, "POST", "/generate",
            json={"seed_text": "A", "max_new_chars": 2000, "stream": True}) as es:
        events.extend((ev.event, ev.json()) for ev in es.iter_sse())
    del graph.run  # the class's own run again
    kinds = [k for k, _ in events]
    assert kinds[-2:] == ["error", "done"]
    error = events[-2][1]["error"]
    assert isinstance(error, dict)
    assert "model error during decoding" in error["message"]
    assert "/secret/path" not in error["message"]
    assert events[-1][1]["finish_reason"] == "error"
    with httpx.Client(base_url=url, timeout=30) as c:
        after = c.post("/generate", json={"seed_text": "A", "max_new_chars": 50})
    assert after.status_code == 200
    assert after.json()["finish_reason"] == "length"


def test_json_client_that_disconnects_cancels_its_generation(
        inprocess: tuple[str, object]) -> None:
    url, _ = inprocess
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=0.1) as c:
        c.post("/generate", json={"seed_text": "A", "max_new_chars": 5000,
                                  "time_limit_s": 60})
    with httpx.Client(base_url=url, timeout=10) as c:
        for _ in range(100):
            text = c.get("/metrics").text
            if metric(text, "charlstm_requests_total", model="tiny", outcome="cancelled") >= 1:
                break
            time.sleep(0.02)
        assert metric(text, "charlstm_requests_total", model="tiny", outcome="cancelled") >= 1
        assert metric(text, "charlstm_active_rows", model="tiny") == 0
