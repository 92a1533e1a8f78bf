"""Request traces with OpenTelemetry: off, and free, unless configured.

FastAPI's own telemetry makes each request's server span ("POST /generate"): it reads the W3C
`traceparent` header (the global propagator: trace context and baggage by default), and with
`auto_configure` exports over OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), naming the service by OTEL_SERVICE_NAME. Without those
variables nothing is configured: FastAPI finds no tracer provider and makes no span, and
`Tracing.begin` returns None, so a request costs one attribute test here.

This module adds what only the service knows, as children and events of that span:

    charlstm.queue    submitted (HTTP worker) -> admitted to a row (engine)
    charlstm.prefill  admitted -> first character (engine): seed slices and the first sample
    charlstm.decode   first character -> finished (engine)

with the events `admission_answered` (worker: the engine's answer arrived) and `first_char`,
`finished` (engine), and the model, key name, sizes, finish reason and both processes' pids.

Built in the HTTP worker from the timestamps the engine measured and already sends (Started,
Finished: time.perf_counter, CLOCK_MONOTONIC, the same clock in every process of the host),
rather than by spans emitted in the engine process: the engine's loop stays free of tracing
work, engine processes need no exporter, trace context need not cross ZeroMQ, and each request
is exported once, with its parent, from the process that holds the server span.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from fastapi.telemetry import TelemetryConfig

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from app.engine.messages import Finished

NOT_TRACED = ("/health", "/ready", "/metrics", "/static/", "/docs", "/openapi.json", "/redoc")


def exporting_from_env() -> bool:
    """The standard variables ask for OTLP export of traces."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def environment_problem() -> str | None:
    """Why the environment's tracing set-up cannot work here, for a clear start-up error."""
    if not exporting_from_env():
        return None
    missing = [m for m in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
               if importlib.util.find_spec(m) is None]
    if missing:
        return ("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK and OTLP "
                "exporter are not installed: pip install 'charlstm[otel]'")
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    if protocol != "http/protobuf":
        return f"OTEL_EXPORTER_OTLP_PROTOCOL must be http/protobuf here, got {protocol!r}"
    return None


def _not_traced(scope: MutableMapping[str, Any]) -> bool:
    path = str(scope.get("path", ""))
    return path in NOT_TRACED or path.startswith(NOT_TRACED)


def telemetry_config(provider: TracerProvider | None) -> TelemetryConfig:
    """FastAPI(telemetry=...): request spans only (Prometheus has the metrics), no spans
    for FastAPI's own operations, none for probes and scrapes."""
    return TelemetryConfig(tracer_provider=provider, tracing=True, metrics=False, logs=False,
                           operation_spans=False, auto_configure=exporting_from_env(),
                           exclude=_not_traced)


class Tracing:
    """Adds the engine's story to the current request's span."""

    def __init__(self, tracer: Tracer, key_names: dict[bytes, str]) -> None:
        self.tracer = tracer
        self.key_names = key_names

    @staticmethod
    def make(provider: TracerProvider | None, key_names: dict[bytes, str]) -> Tracing | None:
        """Tracing with this provider, or with the one the environment configures; None
        when neither (imports nothing more then)."""
        if provider is None and not exporting_from_env():
            return None
        from opentelemetry import trace

        tracer = (provider.get_tracer("charlstm") if provider is not None
                  else trace.get_tracer("charlstm"))
        return Tracing(tracer, key_names)

    def begin(self) -> RequestTrace | None:
        from opentelemetry import trace

        span = trace.get_current_span()
        return RequestTrace(self, span) if span.is_recording() else None


class RequestTrace:
    def __init__(self, tracing: Tracing, span: Span) -> None:
        self.tracing = tracing
        self.span = span

    def start(self, model: str, seed_chars: int, max_new: int, scope: bytes) -> None:
        self.span.set_attributes({
            "charlstm.model": model, "charlstm.seed_chars": seed_chars,
            "charlstm.max_new_chars": max_new, "charlstm.worker_pid": os.getpid(),
            "charlstm.key": self.tracing.key_names.get(scope, "anonymous" if not scope
                                                       else "unknown")})

    def answered(self, refused: str | None = None) -> None:
        """The engine's admission answer reached this worker."""
        attrs = {"process": "worker"}
        if refused is not None:
            attrs["charlstm.refused"] = refused
        self.span.add_event("admission_answered", attrs)

    def finished(self, f: Finished, engine_pid: int | None) -> None:
        """Child spans and events from the engine's timestamps (perf_counter seconds)."""
        from opentelemetry import trace

        now_ns, now = time.time_ns(), time.perf_counter()

        def ns(t: float) -> int:
            return now_ns - int((now - t) * 1e9)

        parent = trace.set_span_in_context(self.span)
        tracer = self.tracing.tracer
        engine = {"process": "engine"} | ({"pid": engine_pid} if engine_pid else {})
        started = f.started
        admitted = started.admitted_at if started else f.finished_at
        phases: list[tuple[str, float, float, dict[str, float | int]]] = [
            ("charlstm.queue", f.submitted_at, admitted, {})]
        if started is not None:
            phases += [
                ("charlstm.prefill", started.admitted_at, started.first_at,
                 {"charlstm.prefill_compute_ms": round(started.prefill_s * 1e3, 3)}),
                ("charlstm.decode", started.first_at, f.finished_at,
                 {"charlstm.sampled": f.sampled})]
        for name, t0, t1, attrs in phases:
            child = tracer.start_span(name, context=parent, start_time=ns(t0),
                                      attributes=attrs)
            child.end(end_time=ns(max(t1, t0)))
        if started is not None:
            self.span.add_event("first_char", engine, timestamp=ns(started.first_at))
        self.span.add_event("finished", {**engine, "reason": f.reason},
                            timestamp=ns(f.finished_at))
        self.span.set_attributes({"charlstm.finish_reason": f.reason,
                                  "charlstm.sampled": f.sampled})
        if engine_pid:
            self.span.set_attribute("charlstm.engine_pid", engine_pid)
