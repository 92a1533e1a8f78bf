"""Request traces (issue 20, point 2): a W3C traceparent is the parent of the request's span,
whose children and events come from the engine's timestamps and the worker's; off (nothing
imported, nothing recorded) unless configured; the standard OTEL_* variables configure a real
`python -m app`, whose engine runs in another process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.conftest import ROOT, start_server, stop_server

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
PHASES = ["charlstm.queue", "charlstm.prefill", "charlstm.decode"]


@pytest.fixture(scope="module")
def traced(tiny_models: Path) -> Iterator[tuple[TestClient, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(models_dir=tiny_models, default_model="tiny",
                        api_keys="tr-secret;name=tracer, thin-secret;name=thin;chars_per_min=1",
                        max_wait_s=1e6)
    with TestClient(create_app(settings, tracer_provider=provider),
                    base_url="http://localhost",
                    headers={"Authorization": "Bearer tr-secret"}) as client:
        yield client, exporter


def request_spans(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, list[ReadableSpan]]:
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert server.context is not None
    children = sorted((s for s in spans if s.parent is not None
                       and s.parent.span_id == server.context.span_id),
                      key=lambda s: s.start_time or 0)
    return server, children


def check_request_trace(server: ReadableSpan, children: list[ReadableSpan]) -> None:
    assert server.context is not None
    assert server.parent is not None
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert f"{server.parent.span_id:016x}" == PARENT_ID
    assert server.parent.is_remote
    assert [c.name for c in children] == PHASES
    assert all(c.context is not None and f"{c.context.trace_id:032x}" == TRACE_ID
               for c in children)
    # The phases tile the request: queue -> prefill -> decode, in the engine's time.
    times = [(c.start_time or 0, c.end_time or 0) for c in children]
    assert all(t0 <= t1 for t0, t1 in times)
    assert times[0][1] == times[1][0]
    assert times[1][1] == times[2][0]
    assert (server.start_time or 0) <= times[0][0] + 5_000_000  # the worker's clock, 5 ms
    events = {e.name: e for e in server.events}
    assert set(events) >= {"admission_answered", "first_char", "finished"}
    assert events["admission_answered"].attributes == {"process": "worker"}
    assert events["first_char"].attributes is not None
    assert events["first_char"].attributes["process"] == "engine"
    assert events["first_char"].timestamp == times[2][0]
    attrs = server.attributes or {}
    assert attrs["charlstm.model"] == "tiny"
    assert attrs["charlstm.finish_reason"] == "length"


def test_a_traceparent_is_the_parent_and_the_engine_phases_are_children(
        traced: tuple[TestClient, InMemorySpanExporter]) -> None:
    client, exporter = traced
    for stream in (False, True):
        exporter.clear()
        reply = client.post("/generate", headers={"traceparent": TRACEPARENT},
                            json={"seed_text": "The ", "max_new_chars": 30, "stream": stream})
        assert reply.status_code == 200
        server, children = request_spans(exporter)
        assert server.name == "POST /generate"
        check_request_trace(server, children)
        assert (server.attributes or {})["charlstm.key"] == "tracer"  # its name, not the key
        assert "tr-secret" not in str(server.attributes)


def test_openai_completions_are_traced_and_probes_are_not(
        traced: tuple[TestClient, InMemorySpanExporter]) -> None:
    client, exporter = traced
    exporter.clear()
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert exporter.get_finished_spans() == ()
    reply = client.post("/v1/completions", headers={"traceparent": TRACEPARENT},
                        json={"model": "tiny", "prompt": "The ", "max_tokens": 12})
    assert reply.status_code == 200, reply.text
    server, children = request_spans(exporter)
    assert server.name == "POST /v1/completions"
    check_request_trace(server, children)


def test_a_refused_request_says_so_in_its_span(
        traced: tuple[TestClient, InMemorySpanExporter]) -> None:
    client, exporter = traced
    thin = {"traceparent": TRACEPARENT, "Authorization": "Bearer thin-secret"}
    body = {"seed_text": "A", "max_new_chars": 10}
    assert client.post("/generate", headers=thin, json=body).status_code == 200  # into debt
    exporter.clear()
    assert client.post("/generate", headers=thin, json=body).status_code == 429
    server, children = request_spans(exporter)
    assert children == []
    assert f"{server.parent.span_id:016x}" == PARENT_ID  # type: ignore[union-attr]
    assert (server.attributes or {})["http.response.status_code"] == 429
    (answer,) = [e for e in server.events if e.name == "admission_answered"]
    assert answer.attributes == {"process": "worker", "charlstm.refused": "overloaded"}


@pytest.mark.slow  # a real server process
def test_without_configuration_nothing_is_imported_or_recorded(tiny_models: Path) -> None:
    code = (
        "import sys\n"
        "from starlette.testclient import TestClient\n"
        "from app.main import create_app\n"
        "from app.settings import Settings\n"
        f"app = create_app(Settings(models_dir={str(tiny_models)!r}, default_model='tiny'))\n"
        "assert app.state.service.tracing is None\n"
        "with TestClient(app, base_url='http://localhost') as c:\n"
        "    r = c.post('/generate', json={'max_new_chars': 5},\n"
        f"               headers={{'traceparent': {TRACEPARENT!r}}})\n"
        "    assert r.status_code == 200, r.text\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --- the standard environment variables, a real `python -m app` --------------------------

class Collector:
    """An OTLP/HTTP traces endpoint: keeps each export's decoded request."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        self.received: list[Any] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    collector.received.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.http = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        out = []
        for req in self.received:
            for rs in req.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                out += [(resource, span) for ss in rs.scope_spans for span in ss.spans]
        return out


@pytest.mark.slow  # real server processes
def test_otel_environment_variables_export_the_trace_of_both_processes(
        tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    collector = Collector()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "charlstm-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    srv = start_server(tiny_models, tmp_path / "server.log", http_workers="1")
    try:
        with srv.client() as c:
            reply = c.post("/generate", headers={"traceparent": TRACEPARENT},
                           json={"seed_text": "The ", "max_new_chars": 20})
            assert reply.status_code == 200
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(collector.spans()) < 4:
            time.sleep(0.1)
    finally:
        stop_server(srv)
        collector.http.shutdown()
    spans = collector.spans()
    by_name = {span.name: (resource, span) for resource, span in spans}
    assert set(by_name) >= {"POST /generate", *PHASES}, list(by_name)
    resource, server = by_name["POST /generate"]
    assert resource["service.name"] == "charlstm-test"
    assert server.trace_id.hex() == TRACE_ID
    assert server.parent_span_id.hex() == PARENT_ID
    for name in PHASES:
        assert by_name[name][1].parent_span_id == server.span_id
    attrs = {a.key: a.value for a in server.attributes}
    worker, engine = attrs["charlstm.worker_pid"].int_value, attrs["charlstm.engine_pid"].int_value
    assert worker != engine  # the engine's timestamps came from its own process
    events = {e.name: {a.key: a.value.string_value for a in e.attributes}
              for e in server.events}
    assert events["admission_answered"]["process"] == "worker"
    assert events["first_char"]["process"] == "engine"
