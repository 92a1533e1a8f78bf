"""All service settings, read from the environment (prefix CHARLSTM_) and validated at start-up."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypedDict

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.tenants import ApiKey, TenantSpec, parse_keys, tenant_table

if TYPE_CHECKING:
    from app.engine.client import ClientTimings
    from app.engine.loop import LoopTimings


class EngineLimits(TypedDict):
    """What an engine (either driver) takes from the settings."""

    max_batch: int
    max_queue: int
    max_wait_s: float
    prefill_chunk_chars: int
    state_cache_bytes: int
    tenants: dict[bytes, TenantSpec]


class Settings(BaseSettings):
    # Errors never echo the value given: CHARLSTM_API_KEYS and the continuation key are secrets.
    model_config = SettingsConfigDict(env_prefix="CHARLSTM_", env_file=None, extra="ignore",
                                      hide_input_in_errors=True)

    models_dir: Path = Field(Path("models"), description="folder with one sub-folder per model")
    default_model: str = Field("shakespeare", description="model used when a request names none")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="onnxruntime provider: CUDA when available (auto), or forced")
    variant: Literal["auto", "fp32", "int8"] = Field(
        "auto", description="graph to serve: auto = model.onnx, or the model's int8 variant on "
        "the CPU when model.json lists one measured batch-invariant (seeded text must not change "
        "with load); int8 = the variant anyway (faster, seeds reproduce only alone)")
    intra_op_threads: int = Field(
        1, ge=0, description="onnxruntime threads per call; 1 is fastest for small batches on "
        "a 2-core CPU, 0 lets onnxruntime use every core")
    max_batch: int = Field(256, ge=1, le=4096, description="active rows per model")
    max_queue: int = Field(256, ge=0, le=100_000,
                           description="requests waiting per model before 429, whatever the "
                           "predicted wait (a memory bound)")
    max_wait_s: float = Field(
        10.0, gt=0, description="refuse (429) a request predicted to wait longer than this for "
        "a batch row; Retry-After says when the wait will be under it")
    state_cache_mb: float = Field(
        64.0, ge=0, le=1_000_000, description="per model: the exact state cache's budget in MiB "
        "(states after seed prefixes, 4 KB each for models/shakespeare); 0 switches it off")
    prefill_chunk_chars: int = Field(
        256, ge=1, le=100_000, description="seed characters prefilled per decode step, shared "
        "by all seeds in prefill: a running stream waits at most one such slice between "
        "characters, however long the seeds others send")
    decode_steps: int = Field(
        8, ge=0, le=64, description="characters per row per onnxruntime call, sampled inside "
        "the model's decode graph with this K (model.json decode_graphs, built from the graph "
        "served; CPU provider); 0, or no such graph listed: one character per call, sampled "
        "on the host")
    max_n: int = Field(16, ge=1, le=4096, description="most choices (n, best_of) one request "
                       "may ask for; each takes a batch row (at most CHARLSTM_MAX_BATCH)")
    max_new_chars: int = Field(5000, ge=1, le=10_000_000,
                               description="upper bound for max_new_chars")
    default_new_chars: int = Field(200, ge=1, description="max_new_chars when omitted")
    max_seed_chars: int = Field(4000, ge=1, description="longest accepted seed_text")
    time_limit_s: float = Field(120.0, gt=0, description="per-request wall-time limit")
    max_body_bytes: int = Field(65536, ge=1024, description="larger request bodies get 413")
    # HTTP limits, enforced before a request reaches the app (app/connections.py, uvicorn).
    max_header_bytes: int = Field(
        16384, ge=1024, le=1 << 20, description="request line plus headers; a larger block "
        "gets 431 and the connection closed (16 KiB, as Node.js and h11)")
    max_headers: int = Field(100, ge=8, description="header fields per request; more get 431 "
                                                    "(100, as Apache)")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's header block must be complete this long after the "
        "connection opens, or after the request's first byte on a kept-alive connection; "
        "then 408 and close")
    body_timeout_s: float = Field(
        10.0, gt=0, description="longest wait for more of a request body; then 408 and close")
    max_connections: int = Field(
        2048, ge=1, description="open connections (and running requests) before new requests "
        "get uvicorn's 503; above the request capacity of two models at the default rows and "
        "queue (2 x 512), so a full model still answers its own 429")
    api_keys: Annotated[list[ApiKey], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer keys, each optionally "
        "followed by ;name=NAME (its label in metrics; default keyN), ;weight=W (its share of "
        "the rows and queue when keys compete; default 1) and ;chars_per_min=N (a budget in "
        "characters of work, seed + max_new_chars, per minute and model: over it, 429 with "
        "Retry-After). Example: 'k1;name=web;weight=3, k2;name=batch;chars_per_min=600000'. "
        "Empty disables auth")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated allowed browser origins")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated host names (Host header, any port) "
        "this service answers to besides localhost ones, and whose pages may POST to it: "
        "'api.example.com', '*.example.com' (its subdomains), '*' (any Host). Empty: bound "
        "to a loopback address, localhost names only (against DNS rebinding); bound to "
        "another address, any Host")
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated addresses or networks (CIDR) of "
        "reverse proxies whose X-Forwarded-For and X-Forwarded-Proto are believed (uvicorn's "
        "forwarded_allow_ips); '*' believes any peer. A request from one of them is never "
        "local to POST /admin/reload. Empty: no forwarded header is believed")
    admin_local: bool = Field(
        False, description="accept POST /admin/reload without API keys from a caller on this "
        "host: a loopback peer that is not a trusted proxy and forwards nobody (no "
        "Forwarded, X-Forwarded-For or X-Real-IP). Off: without keys it answers 403. Behind a "
        "same-host proxy, list the proxy in CHARLSTM_TRUSTED_PROXIES or leave this off")
    drain_s: float = Field(20.0, ge=0, description="SIGTERM grace period for running requests")
    keepalive_s: float = Field(15.0, gt=0, description="SSE keep-alive comment interval")
    log_level: str = Field("info", description="Python logging level")
    continuation_key: str = Field(
        "", description="secret that seals continuation handles; set the same one on every "
        "replica for handles that work anywhere and survive restarts. Empty: a random key per "
        "start (handles then last until the service restarts)")
    continuation_ttl_s: float = Field(86400.0, gt=0, description="how long a continuation "
                                      "handle stays valid")
    http_workers: int = Field(
        0, ge=0, le=64, description="HTTP worker processes for `python -m app`; 0 picks one "
        "per two cores (at least one), leaving the rest to the engine processes")
    watch_models: bool = Field(
        True, description="`python -m app` only: load a new or changed model folder while "
        "serving as soon as it appears (watchfiles); off: only on SIGHUP or POST /admin/reload")
    # --- timings of the process layout (tests shorten them) --------------------------------
    engine_heartbeat_s: float = Field(
        0.1, gt=0, le=10, description="how often engines and HTTP workers tell each other they "
        "are alive")
    engine_hung_s: float = Field(
        10.0, gt=0, description="an engine process alive but silent this long (a deadlock, a "
        "stuck driver call) is killed and restarted; a slower one (a CPU quota, a pause) keeps "
        "its requests. Workers give up on a silent engine 5 s after this")
    engine_start_timeout_s: float = Field(
        300.0, gt=0, description="longest an engine may take to load and warm a model")
    client_ttl_s: float = Field(
        5.0, gt=0, description="an HTTP worker silent this long to an engine has died: its "
        "requests there are cancelled")
    restarts_allowed: int = Field(
        5, ge=0, description="engine (or worker) restarts allowed per restart_window_s before "
        "the service exits 1 for its orchestrator to restart it")
    restart_window_s: float = Field(60.0, gt=0, description="see restarts_allowed")
    engine_dir: Path | None = Field(
        None, description="set by `python -m app` for its workers: the folder of the engine "
        "processes' sockets. Unset (as under `uvicorn app.main:app`), every model's engine "
        "runs on a thread inside the one process")

    def loop_timings(self) -> LoopTimings:
        from app.engine.loop import LoopTimings

        return LoopTimings(heartbeat_s=self.engine_heartbeat_s, client_ttl_s=self.client_ttl_s)

    def client_timings(self) -> ClientTimings:
        from app.engine.client import ClientTimings

        return ClientTimings(heartbeat_s=self.engine_heartbeat_s,
                             hung_after_s=self.engine_hung_s + 5.0)

    def engine_limits(self) -> EngineLimits:
        return EngineLimits(max_batch=self.max_batch, max_queue=self.max_queue,
                            max_wait_s=self.max_wait_s,
                            prefill_chunk_chars=self.prefill_chunk_chars,
                            state_cache_bytes=int(self.state_cache_mb * 2**20),
                            tenants=tenant_table(self.api_keys))

    @property
    def key_secrets(self) -> list[str]:
        return [k.key for k in self.api_keys]

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, v: object) -> list[ApiKey]:
        return parse_keys(v)

    @field_validator("cors_origins", "allowed_hosts", "trusted_proxies", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        if isinstance(v, str):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for entry in v:
            if entry == "*":
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"takes IP addresses, networks (10.0.0.0/8) or '*', got "
                                 f"{entry!r}") from None
        return v

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, v: list[str]) -> list[str]:
        for entry in v:
            if "/" in entry or (":" in entry and not entry.startswith("[")
                                and entry.count(":") == 1):
                raise ValueError(f"takes host names without scheme or port (as "
                                 f"'api.example.com' or '*.example.com'), got {entry!r}")
        return v
