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
    MAX_CHOICES,
    MAX_CONSTRAINT_CHARS,
    Bias,
    CharDetail,
    FieldNames,
    GenerateRequest,
    GenerateResponse,
    Seed,
    Stops,
    StructuredOutputs,
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
V1_NAMES = FieldNames(seed_text="prompt", max_new_chars="max_tokens", bias_by_id=True)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text (no constraint), json_object or json_schema."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


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
    # Constraints: vLLM's structured_outputs, its older guided_* fields and OpenAI's
    # response_format all become one structured_outputs (at most one of them per request).
    structured_outputs: StructuredOutputs | None = None
    guided_regex: str | None = Field(None, max_length=MAX_CONSTRAINT_CHARS)
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    guided_json: dict[str, Any] | str | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, Bias] | None = Field(
        None, max_length=4096, description="token id (the model's character id) or the "
        "character itself -> additive bias in [-100, 100]; -100 bans it")

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

    def structured(self) -> StructuredOutputs | None:
        """The one constraint this request asks for, whichever field it came in."""
        given: dict[str, StructuredOutputs] = {}
        if self.structured_outputs is not None:
            given["structured_outputs"] = self.structured_outputs
        if self.guided_regex is not None:
            given["guided_regex"] = StructuredOutputs(regex=self.guided_regex)
        if self.guided_choice is not None:
            given["guided_choice"] = StructuredOutputs(choice=self.guided_choice)
        if self.guided_json is not None:
            given["guided_json"] = StructuredOutputs(json_=self.guided_json)
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given["response_format"] = StructuredOutputs(json_object=True)
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise InvalidRequestError(
                    'response_format of type "json_schema" needs json_schema.schema')
            given["response_format"] = StructuredOutputs(json_=fmt.json_schema.schema_)
        if len(given) > 1:
            raise InvalidRequestError(f"send one constraint per request, got {', '.join(given)}")
        return next(iter(given.values()), None)

    def to_generate(self) -> GenerateRequest:
        return GenerateRequest.model_construct(
            model=self.model, seed_text=self.prompt_text(), temperature=self.temperature,
            max_new_chars=self.max_tokens, top_k=0, top_p=self.top_p, seed=self.seed,
            stop=self.stop or [], stream=self.stream, details=self.logprobs is not None,
            time_limit_s=None, structured_outputs=self.structured(),
            logit_bias=self.logit_bias,
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
