"""HTTP request and response bodies (text and JSON; the engine never sees these)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_TEMPERATURE = 5.0
MAX_STOPS = 8
MAX_STOP_CHARS = 64
FinishReason = Literal["length", "stop", "time_limit", "cancelled", "error"]


def check_temperature(v: float) -> float:
    if not math.isfinite(v) or not 0 <= v <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {v:g}")
    return v


def check_top_p(v: float) -> float:
    if not math.isfinite(v) or not 0 < v <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {v:g}")
    return v


def check_seed(v: int | None) -> int | None:
    if v is not None and not 0 <= v < 2**63:
        raise ValueError(f"seed must be in [0, 2^63), got {v}")
    return v


def check_stops(v: list[str] | str | None) -> list[str]:
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > MAX_STOPS:
        raise ValueError(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}")
    for s in stops:
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters, "
                             f"got {len(s)}")
    return stops


# Sampling fields shared by /generate and /v1/completions, validated the same way.
Temperature = Annotated[float, AfterValidator(check_temperature)]
TopP = Annotated[float, AfterValidator(check_top_p)]
Seed = Annotated[int | None, AfterValidator(check_seed)]
Stops = Annotated[list[str] | str | None, AfterValidator(check_stops)]


class GenerateRequest(BaseModel):
    # strict: false is not a temperature and "3" is not a count; JSON types must match.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{
        "model": "shakespeare", "seed_text": "ROMEO:\n", "temperature": 0.5,
        "max_new_chars": 200, "seed": 42, "stop": ["\n\n"], "stream": False}]})

    model: str | None = Field(None, description="model name; default from settings")
    seed_text: str = Field(
        "", max_length=100_000,
        description="text to continue. Empty starts a new passage: the model is primed with a "
        "newline that is not echoed back. Lowercased first for models trained on lowercase.")
    temperature: Temperature = Field(
        1.0, description="0 is greedy (argmax); otherwise softmax(log(p) / T), in [0, 5]")
    max_new_chars: int | None = Field(None, description="characters to generate (1 to the limit)")
    top_k: int = Field(0, description="sample among the k likeliest characters; 0 is off")
    top_p: TopP = Field(1.0, description="nucleus sampling mass in (0, 1]; 1 is off")
    seed: Seed = Field(None, description="random seed for a reproducible reply")
    stop: Stops = Field(
        None, description="stop string(s), never included in the reply; up to 8, 64 chars each")
    stream: bool = Field(False, description="reply with server-sent events")
    details: bool = Field(False, description="add each character's probability and the top "
                                             "alternatives")
    time_limit_s: float | None = Field(None, description="wall-time limit, at most the server's")



    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"top_k must be >= 0 (0 switches it off), got {v}")
        return v


    @field_validator("max_new_chars")
    @classmethod
    def _max_new(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"max_new_chars must be >= 1, got {v}")
        return v

    @field_validator("time_limit_s")
    @classmethod
    def _time_limit(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise ValueError(f"time_limit_s must be a positive number, got {v:g}")
        return v



class Usage(BaseModel):
    seed_chars: int
    generated_chars: int


class Timings(BaseModel):
    queue_ms: float
    prefill_ms: float
    first_char_ms: float
    decode_ms: float
    total_ms: float


class Alternative(BaseModel):
    char: str
    prob: float


class CharDetail(BaseModel):
    char: str
    prob: float
    top: list[Alternative]


class GenerateResponse(BaseModel):
    model: str
    text: str
    finish_reason: FinishReason
    seed: int
    seed_text: str = Field(description="the seed as the model saw it")
    lowercased: bool = Field(description="true when the seed was lowercased for this model")
    usage: Usage
    timings: Timings
    error: str | None = None
    details: list[CharDetail] | None = None


class StateInfo(BaseModel):
    input: str
    output: str
    size: int


class ModelInfo(BaseModel):
    name: str
    cell: str
    layers: int
    units: int
    embedding_dim: int
    parameters: int
    vocab_size: int
    lowercase: bool
    provider: str
    validation_loss_nats: float | None
    validation_bits_per_char: float | None
    corpus: str
    predicted_wait_s: float = Field(
        0.0, description="predicted wait for a batch row of a request sent now (429 past the "
        "server's limit)")
    chars_per_s: float = Field(0.0, description="characters delivered per second while "
                               "decoding (smoothed)")


class ModelDetail(ModelInfo):
    vocab: list[str]
    states: list[StateInfo]
    training: dict[str, object]
    versions: dict[str, str]
    active_rows: int
    waiting: int


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class ErrorInfo(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorInfo
