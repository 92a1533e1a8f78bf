"""HTTP request and response bodies (text and JSON; the engine never sees these)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)

MAX_TEMPERATURE = 5.0
MAX_TOP_K = 2**31 - 1
MAX_STOPS = 8
MAX_STOP_CHARS = 64
MAX_CHOICES = 256
MAX_CONSTRAINT_CHARS = 20_000  # a regex, a choice, or a JSON schema as sent
FinishReason = Literal["length", "stop", "time_limit", "cancelled", "error"]


def shown(v: object) -> str:
    """A number as an error message shows it: as sent when short, else its first digits and
    its length (a 4000-digit integer is valid JSON)."""
    text = f"{v:g}" if isinstance(v, float) else str(v)
    if len(text) <= 24:
        return text
    return f"{text[:12]}... ({len(text.lstrip('-'))} digits)"


def number_in(lo: float, hi: float, *, lo_open: bool = False, want: str | None = None,
              note: str = "") -> WrapValidator:
    """Refuse a number outside [lo, hi] ((lo, hi] with lo_open), NaN included, with a message
    naming the field and the range. It runs before type validation, so a number the field's
    type cannot hold (2**64 as top_k, 10**400 as a temperature) gets this message too, rather
    than pydantic's "not a valid number" or an overflow deeper in. Python compares ints and
    floats exactly, so no conversion can overflow here."""
    want = want or f"in {'(' if lo_open else '['}{shown(lo)}, {shown(hi)}]"

    def check(v: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        if isinstance(v, int | float) and not isinstance(v, bool):
            too_low = v <= lo if lo_open else v < lo
            if too_low or v > hi or (isinstance(v, float) and math.isnan(v)):
                raise ValueError(f"{info.field_name} must be {want}{note}, got {shown(v)}")
        return handler(v)

    return WrapValidator(check)


def check_stops(v: list[str] | str | None) -> list[str]:
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > MAX_STOPS:
        raise ValueError(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}")
    for s in stops:
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters, "
                             f"got {len(s)}")
    return stops


# Numeric fields shared by /generate and /v1/completions, validated the same way.
Temperature = Annotated[float, number_in(0, MAX_TEMPERATURE)]
TopP = Annotated[float, number_in(0, 1, lo_open=True)]
# Any seed a row's random key can take (app/rng.py).
Seed = Annotated[int | None, number_in(0, 2**63 - 1, want="in [0, 2^63)")]
Stops = Annotated[list[str] | str | None, AfterValidator(check_stops)]
# The engine holds top_k in int64; any k >= the vocabulary size already keeps every id.
TopK = Annotated[int, number_in(0, MAX_TOP_K, note=" (0 switches it off)")]
MinTokens = Annotated[int, number_in(0, 2**62 - 1)]
MinP = Annotated[float, number_in(0, 1)]
# Choices per request; the server's CHARLSTM_MAX_N (and its rows) bound it further.
MAX_CHOICES = 4096
ChoiceCount = Annotated[int, number_in(1, MAX_CHOICES)]
BestOf = Annotated[int | None, number_in(1, MAX_CHOICES)]
# Taken at their neutral values only (app/support.py says why); typed loosely so that the
# refusal names the field and the reason rather than a type.
AnyNumber = Annotated[float | None, number_in(-1e300, 1e300)]
# Finite and positive; a huge value is fine, the server's limit caps it.
TimeLimit = Annotated[float | None, number_in(0, sys.float_info.max, lo_open=True,
                                              want="a positive number of seconds")]


# logit_bias: character (or, on /v1, token id) -> additive bias; -100 bans, +100 all but forces.
Bias = Annotated[float, number_in(-100, 100, note=" (-100 bans the character)")]


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: the generated text must match exactly one of these."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    regex: str | None = Field(None, max_length=MAX_CONSTRAINT_CHARS, description=(
        "Python regex the whole generated text matches (no lookaround or backreferences)"))
    choice: list[Annotated[str, Field(min_length=1, max_length=MAX_CONSTRAINT_CHARS)]] | None = (
        Field(None, min_length=1, max_length=MAX_CHOICES,
              description="the text is exactly one of these strings"))
    json_: dict[str, Any] | str | None = Field(None, alias="json", description=(
        "JSON schema the text is an instance of (compact: at most one space between tokens)"))
    json_object: bool | None = Field(None, description="true: any JSON object")

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [k for k, v in (("regex", self.regex), ("choice", self.choice),
                                ("json", self.json_), ("json_object", self.json_object))
                 if v is not None and v is not False]
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of regex, choice, json, "
                             f"json_object; got {', '.join(given) if given else 'none'}")
        return self


@dataclass(frozen=True)
class FieldNames:
    """What the caller calls the fields that the service checks against its own limits
    (`ModelService.prepare`): /v1/completions says `prompt` and `max_tokens`."""

    seed_text: str = "seed_text"
    max_new_chars: str = "max_new_chars"
    # logit_bias keys: characters (/generate), or token ids as OpenAI's clients send them
    bias_by_id: bool = False


NATIVE_NAMES = FieldNames()


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
    max_new_chars: int | None = Field(
        None, description="characters to generate, 1 to the server's limit; the server's default "
        "when omitted")
    top_k: TopK = Field(0, description="sample among the k likeliest characters; 0 is off")
    top_p: TopP = Field(1.0, description="nucleus sampling mass in (0, 1]; 1 is off")
    seed: Seed = Field(None, description="random seed for a reproducible reply, in [0, 2^63)")
    stop: Stops = Field(
        None, description="stop string(s), never included in the reply; up to 8, 64 chars each")
    stream: bool = Field(False, description="reply with server-sent events")
    details: bool = Field(False, description="add each character's probability and the top "
                                             "alternatives")
    time_limit_s: TimeLimit = Field(None, description="wall-time limit, at most the server's")
    resumable: bool = Field(False, description="add a `continuation` handle to the reply when "
                            "the text ends by length or time limit")
    continuation: str | None = Field(
        None, max_length=200_000, description="continue a generation from its handle: the "
        "text goes on exactly as one longer request would have; send no seed_text or "
        "sampling parameters (the handle carries them)")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="constrain the generated text to a regex, a choice of strings or a "
        "JSON schema (compiled to the model's alphabet; 422 when it needs characters the model "
        "lacks). Ends with finish_reason `stop` once the text is complete")
    logit_bias: dict[str, Bias] | None = Field(
        None, max_length=4096, description="character -> additive bias in [-100, 100] on its "
        "logit before sampling; -100 bans it")
    min_tokens: MinTokens = Field(0, description="stop strings cannot end the text before "
                                  "this many characters")
    n: ChoiceCount = Field(1, description="choices sampled from one prefill, up to the server's "
                       "CHARLSTM_MAX_N; n > 1 replies with `choices`")
    best_of: BestOf = Field(None, description="sample this many choices and return the n with "
                            "the highest mean log-probability per character; not with stream")
    # Accepted at their neutral values only (see app/support.py and the README's table).
    min_p: MinP = Field(0.0, description="drop characters less likely than min_p times the "
                        "likeliest (after temperature); 0 is off")
    repetition_penalty: AnyNumber = Field(None, description="only 1")
    presence_penalty: AnyNumber = Field(None, description="only 0")
    frequency_penalty: AnyNumber = Field(None, description="only 0")


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
    prob: float = Field(description="the model's own probability (temperature 1)")
    top: list[Alternative]
    constrained_prob: float | None = Field(
        None, description="with structured_outputs or logit_bias: the probability after the "
        "bias and the constraint's mask, renormalised (temperature 1)")


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
    continuation: str | None = Field(None, description="with resumable: pass it back as "
                                     "`continuation` to go on from here")
    index: int | None = Field(None, description="which choice (with n > 1 or best_of)")
    logprob_mean: float | None = Field(None, description="with best_of: the mean "
                                       "log-probability per character (nats) it was ranked by")


class GenerateChoices(BaseModel):
    """/generate with n > 1 or best_of: one reply per choice, best first with best_of."""

    model: str
    choices: list[GenerateResponse]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{
        "model": "shakespeare", "text": "To be, or not to be", "context": "HAMLET:\n",
        "top": 3}]})

    model: str | None = Field(None, description="model name; default from settings")
    text: str = Field(..., min_length=1, max_length=100_000,
                      description="the text to score, every character of it")
    context: str = Field(
        "", max_length=100_000, description="text before `text` that conditions it and is not "
        "scored. Empty: the model starts from a newline, as /generate with an empty seed")
    top: Annotated[int, number_in(0, 5)] = Field(
        0, description="alternatives per character, 0 to 5, with their log-probabilities")


class ScoredAlternative(BaseModel):
    char: str
    logprob: float


class CharScore(BaseModel):
    char: str
    logprob: float = Field(description="log p(char | everything before it), nats")
    top: list[ScoredAlternative] | None = None


class ScoreResponse(BaseModel):
    model: str
    text: str = Field(description="the text as the model saw it (lowercased for lowercase "
                      "models, normalised as the model's corpus was)")
    context: str
    chars: int = Field(description="characters scored: every character of `text`")
    total_logprob: float = Field(description="sum of the characters' log-probabilities, nats")
    mean_nats: float = Field(description="mean negative log-probability per character")
    bits_per_char: float = Field(description="mean_nats / ln 2: the figure the training "
                                 "report gives for its validation split")
    perplexity: float = Field(description="exp(mean_nats), per character")
    logprobs: list[CharScore]
    timings: Timings


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
    graph: str = Field("model.onnx", description="graph file served: model.onnx, or a variant "
                       "such as model.int8.onnx (CHARLSTM_VARIANT)")
    decode_graph: str | None = Field(None, description="decode graph that samples "
                                     "CHARLSTM_DECODE_STEPS characters per call inside "
                                     "onnxruntime (built from `graph`); null: one character per "
                                     "call, sampled on the host")
    validation_loss_nats: float | None
    validation_bits_per_char: float | None
    corpus: str
    version: int = Field(1, description="version of the model folder served: 1 at start-up, "
                         "one more per hot reload (`python -m app`)")
    created: str = Field("", description="when the model was exported (model.json)")
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
