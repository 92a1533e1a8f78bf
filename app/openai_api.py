"""OpenAI-compatible endpoints (`/v1/completions`, `/v1/models`), sharing the engine.

A token here is a character. Requests are translated into the native GenerateRequest and run
through the same service; replies and stream chunks take OpenAI's shapes, and the stream ends
with `data: [DONE]`. Errors keep the service's `{"error": {"type", "message"}}` shape, which
the official client reads.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.sse import KEEPALIVE_COMMENT
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.api import ERROR_RESPONSES, Svc, data_event, until_disconnected
from app.auth import requires_key, tenant
from app.engine import Request as EngineRequest
from app.errors import InvalidRequestError, error_body
from app.schemas import (
    FieldNames,
    GenerateRequest,
    GenerateResponse,
    Seed,
    Stops,
    Temperature,
    TopP,
    number_in,
)
from app.service import ModelService, Prepared

router = APIRouter(prefix="/v1", dependencies=[Depends(requires_key)], responses=ERROR_RESPONSES,
                   tags=["openai"])

OPENAI_FINISH = {"length": "length", "stop": "stop", "time_limit": "length"}


# OpenAI's legacy completions default: what its clients expect when they send nothing or null.
DEFAULT_MAX_TOKENS = 16
# How the service's limit checks name these fields in their messages.
V1_NAMES = FieldNames(seed_text="prompt", max_new_chars="max_tokens")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class CompletionRequest(BaseModel):
    # OpenAI clients send fields this service has no use for (user, penalties...): ignore those.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: int | None = Field(
        DEFAULT_MAX_TOKENS, description="characters to generate, 1 to the server's limit; "
        f"omitted or null means {DEFAULT_MAX_TOKENS}, as in OpenAI's API")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    seed: Seed = None
    stop: Stops = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, number_in(1, 1, want="1 (one completion per request)")] = 1
    logprobs: Annotated[int | None, number_in(0, 5)] = Field(
        None, description="top alternatives per character, 0 to 5")
    echo: bool = False

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int | None) -> int:
        return DEFAULT_MAX_TOKENS if v is None else v

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise InvalidRequestError(
                f"prompt must be a string or a list of one string, got {len(self.prompt)} items")
        return self.prompt[0]

    def to_generate(self) -> GenerateRequest:
        return GenerateRequest.model_construct(
            model=self.model, seed_text=self.prompt_text(), temperature=self.temperature,
            max_new_chars=self.max_tokens, top_k=0, top_p=self.top_p, seed=self.seed,
            stop=self.stop or [], stream=self.stream, details=self.logprobs is not None,
            time_limit_s=None,
        )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "charlstm"


class ModelCardList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _logprobs(result: GenerateResponse, top: int, offset: int) -> dict[str, Any] | None:
    if result.details is None:
        return None
    tokens = [d.char for d in result.details]
    return {
        "tokens": tokens,
        "token_logprobs": [math.log(max(d.prob, 1e-45)) for d in result.details],
        "top_logprobs": [{a.char: math.log(max(a.prob, 1e-45)) for a in d.top[:top]}
                         for d in result.details] if top else None,
        "text_offset": [offset + i for i in range(len(tokens))],
    }


def _usage(result: GenerateResponse) -> dict[str, int]:
    p, c = result.usage.seed_chars, result.usage.generated_chars
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@router.get("/models", response_model=ModelCardList)
async def list_models(svc: Svc) -> ModelCardList:
    return ModelCardList(data=[ModelCard(id=name, created=int(s.model.dir.stat().st_mtime))
                               for name, s in sorted(svc.models.items())])


@router.post(
    "/completions", summary="OpenAI-compatible text completion (a token is a character)",
    responses={200: {"content": {
        "application/json": {"schema": {"type": "object"}},
        "text/event-stream": {"description":
                              "with stream=true: `data: {...}` chunks, then `data: [DONE]`"}}}},
)
async def completions(body: CompletionRequest, svc: Svc, request: Request) -> Response:
    native = body.to_generate()
    prep = svc.prepare(native, body.stream, V1_NAMES, scope=tenant(request))
    cid = f"cmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if not body.stream:
        result = await until_disconnected(request, svc.run(prep))
        prefix = prep.seed_text if body.echo else ""
        choice = {"index": 0, "text": prefix + result.text,
                  "finish_reason": OPENAI_FINISH.get(result.finish_reason, "stop"),
                  "logprobs": _logprobs(result, body.logprobs or 0, len(prefix))}
        return JSONResponse({"id": cid, "object": "text_completion", "created": created,
                             "model": prep.served.model.name, "choices": [choice],
                             "usage": _usage(result)})
    req = await svc.submit(prep)
    return StreamingResponse(
        _stream(svc, prep, req, body, cid, created), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(svc: ModelService, prep: Prepared, req: EngineRequest,
                  body: CompletionRequest, cid: str, created: int) -> AsyncIterator[bytes]:
    name = prep.served.model.name

    def chunk(text: str, finish: str | None, logprobs: Any = None,
              usage: dict[str, int] | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": cid, "object": "text_completion", "created": created, "model": name,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                         "finish_reason": finish}] if usage is None else [],
        }
        if usage is not None:
            payload["usage"] = usage
        return data_event(payload)

    svc.open_streams += 1  # a drain waits for this stream's last chunk, as for /generate's
    try:
        offset = 0
        if body.echo and prep.seed_text:
            yield chunk(prep.seed_text, None)
            offset = len(prep.seed_text)
        try:
            async for part in svc.chunks(prep, req, svc.settings.keepalive_s):
                if part is None:
                    yield KEEPALIVE_COMMENT
                    continue
                yield chunk(part["text"], None, _chunk_logprobs(part, body, offset))
                offset += len(part["text"])
        except Exception as exc:  # never cut the stream silently: say so, then finish
            req.cancel()
            yield data_event(error_body("internal_error", f"stream failed: "
                                                          f"{type(exc).__name__}"))
        result = svc.response(prep, req)
        if result.error:
            yield data_event(error_body("generation_error", result.error))
        yield chunk("", OPENAI_FINISH.get(result.finish_reason, "stop"))
        if body.stream_options and body.stream_options.include_usage:
            yield chunk("", None, usage=_usage(result))
        yield b"data: [DONE]\n\n"
    finally:
        svc.open_streams -= 1


def _chunk_logprobs(part: dict[str, Any], body: CompletionRequest, offset: int
                    ) -> dict[str, Any] | None:
    if body.logprobs is None or "details" not in part:
        return None
    top = body.logprobs
    details = part["details"]
    return {"tokens": [d["char"] for d in details],
            "token_logprobs": [math.log(max(d["prob"], 1e-45)) for d in details],
            "top_logprobs": [{a["char"]: math.log(max(a["prob"], 1e-45)) for a in d["top"][:top]}
                             for d in details] if top else None,
            "text_offset": [offset + i for i in range(len(details))]}
