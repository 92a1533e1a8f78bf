"""App factory: settings -> models loaded and warmed in lifespan -> routes, errors, middleware."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from app import admin, api, openai_api, tracing
from app.artifact import ArtifactError
from app.auth import ApiKeyMiddleware
from app.errors import install_handlers
from app.limits import BodyLimitMiddleware
from app.metrics import Metrics
from app.origin import OriginMiddleware
from app.service import ModelService
from app.settings import Settings
from app.tenants import scope_of

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger("app")


def create_app(settings: Settings | None = None,
               tracer_provider: TracerProvider | None = None) -> FastAPI:
    """tracer_provider: trace requests there (tests); without it, requests are traced only
    when the OTEL_* environment asks for it (app/tracing.py)."""
    settings = settings or Settings()
    metrics = Metrics()
    svc = ModelService(settings, metrics)
    problem = tracing.environment_problem()
    if problem is not None:
        raise RuntimeError(f"cannot start: {problem}")
    svc.tracing = tracing.Tracing.make(
        tracer_provider, {scope_of(k.key): k.name for k in settings.api_keys})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            svc.load()
        except ArtifactError as exc:
            log.error("cannot start: %s", exc)
            raise RuntimeError(f"cannot start: {exc}") from None
        svc.start()
        await svc.engines_up(timeout_s=settings.engine_start_timeout_s)
        follower = None
        if settings.engine_dir is not None:
            follower = asyncio.ensure_future(svc.follow())
        else:
            log.info("hot reload is off in this process layout (engines on threads): restart "
                     "to load new or changed models; `python -m app` loads them live")
        log.info("ready: %s", ", ".join(f"{n} on {s.engine.provider}"
                                        for n, s in svc.models.items()))
        try:
            yield
        finally:
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower
            svc.close()

    app = FastAPI(
        title="charlstm",
        summary="Character-level LSTM text generation with continuous batching.",
        version="0.1.0",
        lifespan=lifespan,
        telemetry=tracing.telemetry_config(tracer_provider),
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = svc
    install_handlers(app)
    routers = [api.protected, openai_api.router, openai_api.tokenizer_router, admin.router,
               api.open_routes]
    for router in routers:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=api.STATIC_DIR), name="static")
    # Outermost last: CORS (so browsers can read every refusal), then the Host and Origin
    # check, then the key check, then the body limit: refusals come before the body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, keys=settings.key_secrets,
                       routes=[route for r in routers for route in r.routes])
    app.add_middleware(OriginMiddleware, bind_host=settings.host,
                       allowed_hosts=settings.allowed_hosts, cors_origins=settings.cors_origins)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Accept"])
    return app


def __getattr__(name: str) -> FastAPI:
    """`uvicorn app.main:app` and `fastapi run app/main.py`: the whole service in one process
    (every model's engine on a thread), settings from the environment as for `python -m app`.
    Built on first access, so importing this module starts nothing."""
    if name == "app":
        return create_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
