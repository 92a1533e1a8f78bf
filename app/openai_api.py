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
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.api import ERROR_RESPONSES, Svc
from app.auth import requires_key, tenant
from app.engine.messages import Detail
from app.errors import InvalidRequestError, error_body
from app.replies import data_event, json_reply, sse_response
from app.schemas import (
    CharDetail,
    FieldNames,
    GenerateRequest,
    GenerateResponse,
    Seed,
    Stops,
    Temperature,
    TopP,
    number_in,
)
from app.service import Reply

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


def logprobs(chars: list[str], probs: list[float], tops: list[list[tuple[str, float]]] | None,
             offset: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs object for characters starting at text offset `offset`."""
    return {
        "tokens": chars,
        "token_logprobs": [math.log(max(p, 1e-45)) for p in probs],
        "top_logprobs": [{c: math.log(max(p, 1e-45)) for c, p in top} for top in tops]
        if tops is not None else None,
        "text_offset": [offset + i for i in range(len(chars))],
    }


def detail_logprobs(details: list[CharDetail], top: int, offset: int) -> dict[str, Any]:
    return logprobs([d.char for d in details], [d.prob for d in details],
                    [[(a.char, a.prob) for a in d.top[:top]] for d in details] if top else None,
                    offset)


def _usage(result: GenerateResponse) -> dict[str, int]:
    p, c = result.usage.seed_chars, result.usage.generated_chars
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@router.get("/models", response_model=ModelCardList)
async def list_models(svc: Svc) -> ModelCardList:
    return ModelCardList(data=[ModelCard(id=name, created=int(s.model.dir.stat().st_mtime))
                               for name, s in sorted(svc.models.items())])


class CompletionFormat:
    """`/v1/completions` streamed: OpenAI's chunks, then `data: [DONE]`."""

    def __init__(self, body: CompletionRequest, model: str, seed_text: str) -> None:
        self.body = body
        self.model = model
        self.seed_text = seed_text
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.offset = 0

    def chunk(self, text: str, finish: str | None, logprobs: Any = None,
              usage: dict[str, int] | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": self.id, "object": "text_completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                         "finish_reason": finish}] if usage is None else [],
        }
        if usage is not None:
            payload["usage"] = usage
        return data_event(payload)

    def start(self) -> list[bytes]:
        if self.body.echo and self.seed_text:
            self.offset = len(self.seed_text)
            return [self.chunk(self.seed_text, None)]
        return []

    def chars(self, reply: Reply, ids: list[int], details: list[Detail] | None) -> bytes:
        text = reply.job.served.model.vocab.decode(ids)
        lp = None
        if self.body.logprobs is not None and details is not None:
            lp = detail_logprobs(reply.char_details(ids, details), self.body.logprobs,
                                 self.offset)
        self.offset += len(text)
        return self.chunk(text, None, lp)

    def error(self, type_: str, message: str) -> bytes:
        return data_event(error_body(type_, message))

    def end(self, summary: GenerateResponse) -> list[bytes]:
        out = [self.chunk("", OPENAI_FINISH.get(summary.finish_reason, "stop"))]
        if self.body.stream_options and self.body.stream_options.include_usage:
            out.append(self.chunk("", None, usage=_usage(summary)))
        return [*out, b"data: [DONE]\n\n"]


@router.post(
    "/completions", summary="OpenAI-compatible text completion (a token is a character)",
    responses={200: {"content": {
        "application/json": {"schema": {"type": "object"}},
        "text/event-stream": {"description":
                              "with stream=true: `data: {...}` chunks, then `data: [DONE]`"}}}},
)
async def completions(body: CompletionRequest, svc: Svc, request: Request) -> Response:
    job = svc.prepare(body.to_generate(), body.stream, V1_NAMES, scope=tenant(request))
    fmt = CompletionFormat(body, job.served.model.name, job.seed_text)
    events = await svc.open(job, idle_s=svc.settings.keepalive_s)  # 429 / 503 here
    if body.stream:
        return sse_response(svc, job, events, fmt)
    result = svc.summary(await json_reply(request, svc, job, events))
    prefix = job.seed_text if body.echo else ""
    choice = {"index": 0, "text": prefix + result.text,
              "finish_reason": OPENAI_FINISH.get(result.finish_reason, "stop"),
              "logprobs": detail_logprobs(result.details, body.logprobs or 0, len(prefix))
              if result.details is not None else None}
    return JSONResponse({"id": fmt.id, "object": "text_completion", "created": fmt.created,
                         "model": fmt.model, "choices": [choice], "usage": _usage(result)})
