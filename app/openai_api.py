"""OpenAI-compatible endpoints (`/v1/completions`, `/v1/models`), sharing the engine, and
vLLM's tokenizer routes (`/tokenizer_info`, `/tokenize`, `/detokenize`) that
lm-evaluation-harness's remote tokenizer reads.

A token here is a character, and a token id is the model's own id for it. Requests are
translated into the native GenerateRequest and run through the same service; replies and
stream chunks take OpenAI's shapes, and the stream ends with `data: [DONE]`. Errors keep the
service's `{"error": {"type", "message"}}` shape, which the official client reads.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from app.api import ERROR_RESPONSES, Svc
from app.auth import requires_key, tenant
from app.engine.messages import Detail, Scored
from app.errors import InvalidRequestError, NoChatTemplateError, error_body
from app.replies import data_event, json_reply, sse_response
from app.schemas import (
    MAX_CHOICES,
    MAX_CONSTRAINT_CHARS,
    AnyNumber,
    BestOf,
    Bias,
    CharDetail,
    ChoiceCount,
    ErrorBody,
    FieldNames,
    GenerateRequest,
    GenerateResponse,
    MinP,
    MinTokens,
    Seed,
    Stops,
    StructuredOutputs,
    Temperature,
    TopK,
    TopP,
    number_in,
)
from app.service import Choices, Job, ModelService, Reply
from app.support import NEUTRAL_FIELDS, check_neutral

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


PromptItem = str | list[int]  # one prompt: text, or the model's character ids


def check_prompt(v: Any) -> Any:
    """A string, a list of strings, a list of token ids or a list of token-id lists (OpenAI's
    and vLLM's shapes), with a message that says which part is wrong."""
    if isinstance(v, str):
        return v
    if not isinstance(v, list) or not v:
        raise ValueError("prompt must be a string, a non-empty list of strings, a list of "
                         "token ids, or a list of token-id lists")
    if all(isinstance(x, str) for x in v):
        return v
    lists = all(isinstance(x, list) for x in v)
    for i, ids in enumerate(v if lists else [v]):
        for j, t in enumerate(ids):
            if isinstance(t, int) and not isinstance(t, bool):
                continue
            where = f"prompt[{i}][{j}]" if lists else f"prompt[{j}]"
            if t is None and j == 0:
                raise ValueError(
                    f"{where} is null: a token id must be an integer. lm-eval sends its "
                    "prefix token as null for a tokenizer without BOS or EOS (a character "
                    "model has neither): pass custom_prefix_token_id=<the primer's id, from "
                    "GET /tokenizer_info> in --model_args")
            raise ValueError(f"{where} must be a token id (an integer) in a list of ids, or "
                             f"the prompt a list of strings; got {t!r}")
    return v


class CompletionRequest(BaseModel):
    # Every field a client sends is either done or refused with a reason (app/support.py):
    # nothing is dropped silently.
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: Annotated[str | list[str] | list[int] | list[list[int]],
                      BeforeValidator(check_prompt)] = Field(
        "", description="text, a list of texts (one choice per prompt, times n), the model's "
        "character ids, or a list of id lists (POST /tokenize gives them)")
    suffix: str | None = None
    max_tokens: int | None = Field(
        DEFAULT_MAX_TOKENS, description="characters to generate, 0 to the server's limit; "
        f"omitted or null means {DEFAULT_MAX_TOKENS}, as in OpenAI's API")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = Field(0, description="vLLM's extension: the k likeliest characters; 0 is off")
    min_tokens: MinTokens = 0
    seed: Seed = None
    stop: Stops = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: ChoiceCount = Field(1, description="choices per prompt, from one prefill")
    best_of: BestOf = None
    logprobs: Annotated[int | None, number_in(0, 5)] = Field(
        None, description="top alternatives per character, 0 to 5")
    echo: bool = Field(False, description="return the prompt before the completion; with "
                       "logprobs, with its per-character log-probabilities (the first null)")
    user: str | None = None
    min_p: MinP = 0.0
    repetition_penalty: AnyNumber = None
    presence_penalty: AnyNumber = None
    frequency_penalty: AnyNumber = None
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

    def prompts(self) -> list[PromptItem]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [[x for x in p if isinstance(x, int)]]
        return [x for x in p if isinstance(x, str | list)]

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

    def to_generate(self, prompt: str) -> GenerateRequest:
        return GenerateRequest.model_construct(
            model=self.model, seed_text=prompt, temperature=self.temperature,
            max_new_chars=self.max_tokens, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
            stop=self.stop or [], stream=self.stream, details=self.logprobs is not None,
            time_limit_s=None, structured_outputs=self.structured(),
            min_tokens=self.min_tokens, n=self.n, best_of=self.best_of,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias, continuation=None, resumable=False,
        )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "charlstm"


class ModelCardList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def logprobs(chars: list[str], lps: list[float | None],
             tops: list[dict[str, float] | None] | None, offset: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs object for characters starting at text offset `offset`."""
    return {"tokens": chars, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": [offset + i for i in range(len(chars))]}


def detail_logprobs(details: list[CharDetail], top: int, offset: int) -> dict[str, Any]:
    """The generated characters' logprobs (their probability at temperature 1)."""
    return logprobs([d.char for d in details], [math.log(max(d.prob, 1e-45)) for d in details],
                    [{a.char: math.log(max(a.prob, 1e-45)) for a in d.top[:top]}
                     for d in details] if top else None, offset)


def echo_logprobs(job: Job, scored: Scored | None, top: int) -> dict[str, Any]:
    """The prompt's logprobs from the engine's scores: the first character has no context
    (null), each other one log p(char | the prompt before it)."""
    text = job.seed_text
    values: list[float] = scored.logprobs if scored is not None else []
    lps: list[float | None] = [None, *values] if text else []
    tops: list[dict[str, float] | None] | None = None
    if top:
        chars = job.served.model.vocab.chars
        alts = scored.top if scored is not None and scored.top is not None else []
        tops = [None, *({chars[t]: v for t, v in alt} for alt in alts)] if text else []
    return logprobs(list(text), lps, tops, 0)


def joined(first: dict[str, Any] | None, then: dict[str, Any]) -> dict[str, Any]:
    if first is None:
        return then
    tops = (None if first["top_logprobs"] is None or then["top_logprobs"] is None
            else first["top_logprobs"] + then["top_logprobs"])
    return {k: first[k] + then[k] for k in ("tokens", "token_logprobs", "text_offset")} | {
        "top_logprobs": tops}


def _usage(jobs: list[Job], results: list[GenerateResponse]) -> dict[str, int]:
    p = sum(len(j.seed_text) for j in jobs)
    c = sum(r.usage.generated_chars for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@router.get("/models", response_model=ModelCardList)
async def list_models(svc: Svc) -> ModelCardList:
    return ModelCardList(data=[ModelCard(id=name, created=int(s.model.dir.stat().st_mtime))
                               for name, s in sorted(svc.models.items())])


class CompletionFormat:
    """`/v1/completions` streamed: OpenAI's chunks, one choice each (with its `index`,
    choices interleaved as they come), then `data: [DONE]`."""

    def __init__(self, body: CompletionRequest, model: str, jobs: list[Job]) -> None:
        self.body = body
        self.model = model
        self.jobs = jobs
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}

    def chunk(self, index: int, text: str, finish: str | None, logprobs: Any = None,
              usage: dict[str, int] | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": self.id, "object": "text_completion", "created": self.created,
            "model": self.model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs,
                         "finish_reason": finish}] if usage is None else [],
        }
        if usage is not None:
            payload["usage"] = usage
        return data_event(payload)

    def _echo(self, job: Job, slot: int, lp: Any) -> bytes:
        self.offsets[slot] = len(job.seed_text)
        return self.chunk(slot, job.seed_text, None, lp)

    def start(self) -> list[bytes]:
        if not self.body.echo or self.body.logprobs is not None:
            return []  # with logprobs, the echo waits for the prompt's scores
        return [self._echo(job, i * job.n + k, None) for i, job in enumerate(self.jobs)
                for k in range(job.n) if job.seed_text]

    def scored(self, choices: Choices) -> list[bytes]:
        if not self.body.echo or self.body.logprobs is None:
            return []
        lp = echo_logprobs(choices.job, choices.scored, self.body.logprobs)
        return [self._echo(choices.job, r.slot, lp) for r in choices.replies
                if choices.job.seed_text]

    def chars(self, reply: Reply, ids: list[int], details: list[Detail] | None) -> bytes:
        text = reply.job.served.model.vocab.decode(ids)
        offset = self.offsets.get(reply.slot, 0)
        lp = None
        if self.body.logprobs is not None and details is not None:
            lp = detail_logprobs(reply.char_details(ids, details), self.body.logprobs, offset)
        self.offsets[reply.slot] = offset + len(text)
        return self.chunk(reply.slot, text, None, lp)

    def error(self, type_: str, message: str) -> bytes:
        return data_event(error_body(type_, message))

    def end(self, summaries: list[GenerateResponse]) -> list[bytes]:
        out = [self.chunk(s.index or 0, "", OPENAI_FINISH.get(s.finish_reason, "stop"))
               for s in summaries]
        if self.body.stream_options and self.body.stream_options.include_usage:
            out.append(self.chunk(0, "", None, usage=_usage(self.jobs, summaries)))
        return [*out, b"data: [DONE]\n\n"]


def prepare_jobs(body: CompletionRequest, svc: ModelService, scope: bytes) -> list[Job]:
    """One job per prompt; echo with logprobs scores each prompt in its prefill."""
    check_neutral(body.model_dump(include={f.name for f in NEUTRAL_FIELDS}))
    score_top = body.logprobs if body.echo and body.logprobs is not None else None
    jobs = []
    for i, prompt in enumerate(body.prompts()):
        names = V1_NAMES if len(body.prompts()) == 1 else FieldNames(
            seed_text=f"prompt[{i}]", max_new_chars="max_tokens")
        text = prompt if isinstance(prompt, str) else ""
        ids = None if isinstance(prompt, str) else prompt
        jobs.append(svc.prepare(body.to_generate(text), body.stream, names, scope=scope,
                                prompt_ids=ids, score_top=score_top, min_new=0))
    return jobs


@router.post(
    "/completions", summary="OpenAI-compatible text completion (a token is a character)",
    responses={200: {"content": {
        "application/json": {"schema": {"type": "object"}},
        "text/event-stream": {"description":
                              "with stream=true: `data: {...}` chunks, then `data: [DONE]`"}}}},
)
async def completions(body: CompletionRequest, svc: Svc, request: Request) -> Response:
    jobs = prepare_jobs(body, svc, tenant(request))
    fmt = CompletionFormat(body, jobs[0].served.model.name, jobs)
    runs = await svc.open_all(jobs, idle_s=svc.settings.keepalive_s)  # 429 / 503 here
    if body.stream:
        return sse_response(svc, runs, fmt)
    choices: list[dict[str, Any]] = []
    results = []
    for c in await json_reply(request, svc, runs):
        job = c.job
        echo = (echo_logprobs(job, c.scored, body.logprobs or 0)
                if body.echo and body.logprobs is not None else None)
        prefix = job.seed_text if body.echo else ""
        for reply in c.returned():
            result = svc.summary(reply)
            results.append(result)
            lp = None
            if result.details is not None:
                lp = joined(echo, detail_logprobs(result.details, body.logprobs or 0,
                                                  len(prefix)))
            elif echo is not None:
                lp = echo
            choices.append({"index": reply.slot, "text": prefix + result.text,
                            "finish_reason": OPENAI_FINISH.get(result.finish_reason, "stop"),
                            "logprobs": lp})
    choices.sort(key=lambda ch: int(ch["index"]))
    return JSONResponse({"id": fmt.id, "object": "text_completion", "created": fmt.created,
                         "model": fmt.model, "choices": choices,
                         "usage": _usage(jobs, results)})


@router.post("/chat/completions", summary="Not served: character models have no chat template",
             responses={404: {"model": ErrorBody}})
async def chat_completions() -> Response:
    raise NoChatTemplateError(
        "/v1/chat/completions is not served: these are character-level language models "
        "trained on plain text, without a chat template or roles. Send the text to continue "
        "as `prompt` to /v1/completions (or as `seed_text` to /generate)")


# --- vLLM's tokenizer routes (at the root, where lm-eval's remote tokenizer looks) ----------

tokenizer_router = APIRouter(dependencies=[Depends(requires_key)], responses=ERROR_RESPONSES,
                             tags=["tokenizer"])


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str = Field(max_length=100_000)
    add_special_tokens: bool = Field(False, description="accepted; there are none to add")
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int] = Field(max_length=100_000)


class DetokenizeResponse(BaseModel):
    prompt: str


@tokenizer_router.get("/tokenizer_info", summary="The model's tokenizer: one character a token")
async def tokenizer_info(svc: Svc, model: str | None = None) -> dict[str, Any]:
    served = svc.get(model)
    primer = svc.primer(served)
    vocab = served.model.vocab
    return {
        "model": served.model.name, "tokenizer_class": "CharacterVocabulary",
        "vocab": list(vocab.chars), "vocab_size": len(vocab),
        # No special tokens: a character model has no BOS, EOS, padding or unknown token.
        "bos_token": None, "eos_token": None, "pad_token": None, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "chat_template": None,
        "model_max_length": svc.settings.max_seed_chars,
        "lowercase": served.model.meta.lowercase,
        "normalization": served.model.meta.normalization,
        # What an empty prompt starts from; lm-eval's custom_prefix_token_id takes its id.
        "primer": primer, "primer_token_id": vocab.chars.index(primer),
    }


@tokenizer_router.post("/tokenize", response_model=TokenizeResponse,
                       summary="Text -> the model's character ids (vLLM's shape)")
async def tokenize(body: TokenizeRequest, svc: Svc) -> TokenizeResponse:
    served = svc.get(body.model)
    text = svc.model_text(served, body.prompt, "prompt")
    ids = served.model.vocab.encode(text).tolist()
    return TokenizeResponse(tokens=ids, count=len(ids),
                            max_model_len=svc.settings.max_seed_chars,
                            token_strs=list(text) if body.return_token_strs else None)


@tokenizer_router.post("/detokenize", response_model=DetokenizeResponse,
                       summary="The model's character ids -> text (vLLM's shape)")
async def detokenize(body: DetokenizeRequest, svc: Svc) -> DetokenizeResponse:
    served = svc.get(body.model)
    return DetokenizeResponse(prompt=svc.text_from_ids(served, body.tokens, "tokens"))
