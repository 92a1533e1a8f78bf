"""Prometheus metrics, one registry per app instance (tests build many apps in one process).

Under `python -m app` every process (engines, HTTP workers) writes its values to files in
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode, chosen by the supervisor
before it starts them), and /metrics in any worker renders all of them together.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from app.engine.batch import Sequence

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("charlstm_requests", "generation requests by outcome",
                                ["model", "outcome"], registry=r)
        self.chars = Counter("charlstm_generated_chars", "characters generated", ["model"],
                             registry=r)
        self.queue = Gauge("charlstm_queue_depth", "requests waiting for a batch row",
                           ["model"], registry=r, multiprocess_mode="livesum")
        self.active = Gauge("charlstm_active_rows", "rows in the running batch", ["model"],
                            registry=r, multiprocess_mode="livesum")
        self.wait = Gauge("charlstm_predicted_wait_seconds",
                          "predicted wait for a batch row of a request submitted now "
                          "(admission refuses past CHARLSTM_MAX_WAIT_S)", ["model"], registry=r,
                          multiprocess_mode="livesum")
        self.rate = Gauge("charlstm_chars_per_second",
                          "characters delivered per second while decoding (smoothed)",
                          ["model"], registry=r, multiprocess_mode="livesum")
        self.refusals = Counter("charlstm_refusals", "requests refused for their predicted "
                                "wait, judged afterwards: false = a row came within the bound",
                                ["model", "verdict"], registry=r)
        self.cache_lookups = Counter("charlstm_state_cache_lookups", "seeds looked up in the "
                                     "state cache, by result", ["model", "result"], registry=r)
        self.cache_chars = Counter("charlstm_state_cache_saved_chars", "seed characters whose "
                                   "prefill a cached state saved", ["model"], registry=r)
        self.cache_bytes = Gauge("charlstm_state_cache_bytes", "bytes held by the state cache",
                                 ["model"], registry=r, multiprocess_mode="livesum")
        self.cache_entries = Gauge("charlstm_state_cache_entries", "states held by the cache",
                                   ["model"], registry=r, multiprocess_mode="livesum")
        # For an InferencePool's endpoint picker (Gateway API Inference Extension) and KEDA:
        # queued and running requests are charlstm_queue_depth and charlstm_active_rows; these
        # say how full a replica is, as fractions (docs/DEPLOYMENT.md).
        self.rows_usage = Gauge("charlstm_rows_usage_ratio", "rows held / CHARLSTM_MAX_BATCH "
                                "(0-1): the LSTM's counterpart of a KV-cache utilization",
                                ["model"], registry=r, multiprocess_mode="livesum")
        self.cache_usage = Gauge("charlstm_state_cache_usage_ratio", "state cache bytes held / "
                                 "its budget (0-1)", ["model"], registry=r,
                                 multiprocess_mode="livesum")
        # Per API key, by its configured name (never the key): a bounded label set.
        self.key_requests = Counter("charlstm_key_requests", "generation requests per API key, "
                                    "by outcome", ["model", "key", "outcome"], registry=r)
        self.key_chars = Counter("charlstm_key_chars", "characters of work per API key: seed "
                                 "(prefilled) and generated", ["model", "key", "kind"],
                                 registry=r)
        self.key_refusals = Counter("charlstm_key_refusals", "requests refused per API key, by "
                                    "cause: budget (chars_per_min), capacity (queue full), wait "
                                    "(predicted wait), time_limit", ["model", "key", "cause"],
                                    registry=r)
        self.key_queue = Gauge("charlstm_key_queue_depth", "requests waiting per API key",
                               ["model", "key"], registry=r, multiprocess_mode="livesum")
        self.key_rows = Gauge("charlstm_key_active_rows", "rows held per API key",
                              ["model", "key"], registry=r, multiprocess_mode="livesum")
        self.batch = Histogram("charlstm_batch_size", "rows per decode step", ["model"],
                               buckets=_BATCH_BUCKETS, registry=r)
        self.step = Histogram("charlstm_step_seconds", "onnxruntime time per decode step",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill = Histogram("charlstm_prefill_seconds", "time per prefill call", ["model"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttfc = Histogram("charlstm_time_to_first_char_seconds",
                              "submission to first generated character", ["model"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("charlstm_inter_char_seconds",
                             "mean time between characters, one observation per request",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=r)

    def observer(self, model: str) -> ModelObserver:
        return ModelObserver(self, model)

    def render(self) -> bytes:
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


class ModelObserver:
    """The engine's hooks for one model (called on the engine's worker thread)."""

    def __init__(self, m: Metrics, model: str) -> None:
        self.m, self.model = m, model
        self._batch = m.batch.labels(model)
        self._step = m.step.labels(model)
        self._queue = m.queue.labels(model)
        self._active = m.active.labels(model)
        self._rows_usage = m.rows_usage.labels(model)
        self.max_batch = 0
        self.cache_budget = 0
        if not os.environ.get(MULTIPROC_ENV):  # there, the engine process owns these
            self._queue.set(0)
            self._active.set(0)

    def on_limits(self, max_batch: int, cache_bytes: int) -> None:
        self.max_batch, self.cache_budget = max_batch, cache_bytes
        self._rows_usage.set(0)

    def on_step(self, batch: int, seconds: float) -> None:
        self._batch.observe(batch)
        self._step.observe(seconds)

    def on_prefill(self, rows: int, chars: int, seconds: float) -> None:
        self.m.prefill.labels(self.model).observe(seconds)

    def on_queue(self, waiting: int, active: int) -> None:
        self._queue.set(waiting)
        self._active.set(active)
        if self.max_batch:
            self._rows_usage.set(active / self.max_batch)

    def on_refusal_verdict(self, false: bool) -> None:
        self.m.refusals.labels(self.model, "false" if false else "justified").inc()

    def on_cache(self, hit: bool, chars_saved: int, size_bytes: int, entries: int) -> None:
        self.m.cache_lookups.labels(self.model, "hit" if hit else "miss").inc()
        if chars_saved:
            self.m.cache_chars.labels(self.model).inc(chars_saved)
        self.m.cache_bytes.labels(self.model).set(size_bytes)
        self.m.cache_entries.labels(self.model).set(entries)
        if self.cache_budget:
            self.m.cache_usage.labels(self.model).set(size_bytes / self.cache_budget)

    def on_estimate(self, wait_s: float, chars_per_s: float) -> None:
        self.m.wait.labels(self.model).set(wait_s)
        self.m.rate.labels(self.model).set(chars_per_s)

    def on_finish(self, request: Sequence) -> None:
        self.m.requests.labels(self.model, request.finish_reason or "unknown").inc()
        self.m.chars.labels(self.model).inc(len(request.ids))
        if request.first_at is not None:
            self.m.ttfc.labels(self.model).observe(request.first_at - request.submitted_at)
            if request.finished_at is not None and request.sampled > 1:
                gap = (request.finished_at - request.first_at) / (request.sampled - 1)
                self.m.itl.labels(self.model).observe(gap)

    def on_key(self, key: str, queued: int, rows: int) -> None:
        self.m.key_queue.labels(self.model, key).set(queued)
        self.m.key_rows.labels(self.model, key).set(rows)

    def on_key_finish(self, key: str, outcome: str, seed_chars: int, generated: int) -> None:
        self.m.key_requests.labels(self.model, key, outcome).inc()
        if seed_chars:
            self.m.key_chars.labels(self.model, key, "seed").inc(seed_chars)
        if generated:
            self.m.key_chars.labels(self.model, key, "generated").inc(generated)

    def on_key_refused(self, key: str, cause: str) -> None:
        self.m.key_refusals.labels(self.model, key, cause).inc()

    def on_rejected(self, outcome: str) -> None:
        self.m.requests.labels(self.model, outcome).inc()
