"""HTTP routes. Thin: parse, hand to the service, shape the reply (JSON or server-sent events)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from app.auth import requires_key, tenant
from app.errors import UnavailableError, error_response
from app.replies import NativeFormat, json_reply, native_body, sse_response
from app.schemas import (
    ErrorBody,
    GenerateChoices,
    GenerateRequest,
    GenerateResponse,
    ModelDetail,
    ModelList,
    ScoreRequest,
    ScoreResponse,
)
from app.service import ModelService

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 413, 422, 429, 503)
}


async def service(request: Request) -> ModelService:
    # async on purpose: FastAPI runs a sync dependency on a worker thread, once per request.
    svc: ModelService = request.app.state.service
    return svc


Svc = Annotated[ModelService, Depends(service)]
protected = APIRouter(dependencies=[Depends(requires_key)], responses=ERROR_RESPONSES)
open_routes = APIRouter()


def wants_stream(body: GenerateRequest, accept: str | None) -> bool:
    return body.stream or "text/event-stream" in (accept or "")


@protected.post(
    "/generate", response_model=GenerateResponse | GenerateChoices, tags=["generation"],
    summary="Generate text from a seed",
    responses={200: {"content": {"text/event-stream": {
        "description": "with stream=true: `data: {\"text\": ...}` per chunk, then "
                       "`event: done` with the same summary as the JSON reply"}}}},
)
async def generate(body: GenerateRequest, svc: Svc, request: Request,
                   accept: Annotated[str | None, Header()] = None) -> Response:
    stream = wants_stream(body, accept)
    job = svc.prepare(body, stream, scope=tenant(request))
    runs = await svc.open_all([job], idle_s=svc.settings.keepalive_s)  # 429 / 503 here
    several = job.request.n > 1
    if not stream:
        (choices,) = await json_reply(request, svc, runs)
        summaries = [svc.summary(r) for r in choices.returned()]
        return JSONResponse(native_body(summaries, several))
    return sse_response(svc, runs, NativeFormat(several))


@protected.post(
    "/score", response_model=ScoreResponse, tags=["generation"],
    summary="Score a text: each character's log-probability, bits per character, perplexity",
)
async def score(body: ScoreRequest, svc: Svc, request: Request) -> JSONResponse:
    job = svc.prepare_score(body, scope=tenant(request))
    runs = await svc.open_all([job])  # 429 / 503 here
    (choices,) = await json_reply(request, svc, runs)
    return JSONResponse(svc.score_summary(job, choices).model_dump(mode="json",
                                                                   exclude_none=True))


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
    return Response(request.app.state.metrics.render(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")
