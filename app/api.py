"""HTTP routes. Thin: parse, hand to the service, shape the reply (JSON or server-sent events)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event

from app.auth import requires_key, tenant
from app.errors import ClientGoneError, UnavailableError, error_body, error_response
from app.schemas import ErrorBody, GenerateRequest, GenerateResponse, ModelDetail, ModelList
from app.service import ModelService, Prepared
from app.sse_text import sse_json

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 413, 422, 429, 503)
}


async def service(request: Request) -> ModelService:
    # async on purpose: FastAPI runs a sync dependency on a worker thread, once per request.
    svc: ModelService = request.app.state.service
    return svc


Svc = Annotated[ModelService, Depends(service)]
protected = APIRouter(dependencies=[Depends(requires_key)], responses=ERROR_RESPONSES)
open_routes = APIRouter()


T = TypeVar("T")


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`, cancelling it if the client goes away first (a JSON reply has no stream
    to fail on, so watch the connection for http.disconnect instead)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            # service.run cancels the engine request on the way out; awaiting it here means
            # the row is flagged before this handler returns, and no result is read from a
            # task that never produced one.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientGoneError
    return task.result()


def data_event(payload: dict[str, Any]) -> bytes:
    """One `data:` event. orjson on the hot path (one call per chunk per stream); its JSON
    escapes every newline, and sse_json the separators str.splitlines also breaks at, so the
    payload is a single SSE data line for every reader."""
    return b"data: " + sse_json(payload) + b"\n\n"


def wants_stream(body: GenerateRequest, accept: str | None) -> bool:
    return body.stream or "text/event-stream" in (accept or "")


@protected.post(
    "/generate", response_model=GenerateResponse, tags=["generation"],
    summary="Generate text from a seed",
    responses={200: {"content": {"text/event-stream": {
        "description": "with stream=true: `data: {\"text\": ...}` per chunk, then "
                       "`event: done` with the same summary as the JSON reply"}}}},
)
async def generate(body: GenerateRequest, svc: Svc, request: Request,
                   accept: Annotated[str | None, Header()] = None) -> Response:
    stream = wants_stream(body, accept)
    prep = svc.prepare(body, stream, scope=tenant(request))
    if not stream:
        result = await until_disconnected(request, svc.run(prep))
        return JSONResponse(result.model_dump(mode="json", exclude_none=True))
    req = await svc.submit(prep)  # 429 / 503 here, before the stream starts
    return StreamingResponse(
        sse_stream(svc, prep, req), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def sse_stream(svc: ModelService, prep: Prepared, req: Any) -> AsyncIterator[bytes]:
    """Chunks as `data:` events, then an `error` event if one happened, then `done`."""
    svc.open_streams += 1
    try:
        async for event in _sse_events(svc, prep, req):
            yield event
    finally:
        svc.open_streams -= 1


async def _sse_events(svc: ModelService, prep: Prepared, req: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in svc.chunks(prep, req, svc.settings.keepalive_s):
            if chunk is None:
                yield KEEPALIVE_COMMENT
            else:
                yield data_event(chunk)
    except Exception as exc:  # never cut the stream silently: tell the client, then finish
        req.cancel()
        yield format_sse_event(event="error", data_str=json.dumps(
            error_body("internal_error", f"stream failed: {type(exc).__name__}")))
    summary = svc.response(prep, req)
    if summary.error:
        yield format_sse_event(event="error", data_str=json.dumps(
            error_body("generation_error", summary.error)))
    yield format_sse_event(event="done", data_str=summary.model_dump_json(exclude_none=True))


@protected.get("/models", response_model=ModelList, tags=["models"])
async def list_models(svc: Svc) -> ModelList:
    return ModelList(default=svc.settings.default_model,
                     models=[svc.info(s) for s in svc.models.values()])


@protected.get("/models/{name}", response_model=ModelDetail, tags=["models"])
async def get_model(name: str, svc: Svc) -> ModelDetail:
    return svc.detail(svc.get(name))


STATIC_DIR = Path(__file__).resolve().parent / "static"


@open_routes.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    """The playground page (plain HTML/CSS/JS in app/static, no build step)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@open_routes.get("/health", tags=["ops"], summary="Liveness: the process is up")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@open_routes.get("/ready", tags=["ops"], summary="Readiness: models loaded, warm, not draining",
                 responses={503: {"model": ErrorBody}})
async def ready(svc: Svc) -> JSONResponse:
    if svc.ready:
        return JSONResponse({"status": "ready", "models": sorted(svc.models)})
    dead = svc.dead_engines
    state = ("draining" if svc.draining else
             f"engine stopped for {', '.join(dead)}" if dead else "loading")
    return error_response(UnavailableError(f"not ready: {state}"))


@open_routes.get("/metrics", tags=["ops"], summary="Prometheus metrics",
                 response_class=Response)
async def metrics(request: Request, svc: Svc) -> Response:
    for served in svc.models.values():  # gauges that change between engine events
        served.engine.refresh_metrics()
    return Response(request.app.state.metrics.render(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")
