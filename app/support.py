"""What the generation routes do with each field a client may send: ONE list, read by the
service's checks for `/generate` and `/v1/completions` alike and shown as the README's table
(tests/test_fields.py keeps the two equal).

A field is either done (it changes the output as its note says) or accepted only at its
neutral value (the value that asks for nothing), anything else refused with a 422 that says
why. Nothing a client sends is dropped silently: `/v1/completions` refuses fields it does not
know, as `/generate` always has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.errors import InvalidRequestError

DONE = "done"
NEUTRAL = "neutral only"


@dataclass(frozen=True)
class FieldSupport:
    name: str
    status: str  # DONE | NEUTRAL
    note: str  # what it does, or why only its neutral value is taken
    neutral: Any = None  # NEUTRAL: the one value accepted (None, the field left out, too)
    v1_only: bool = False  # /generate has no such field


FIELDS: tuple[FieldSupport, ...] = (
    FieldSupport("temperature", DONE, "0 is greedy; else softmax(logits / T), in [0, 5]"),
    FieldSupport("top_k", DONE, "sample among the k likeliest characters; 0 is off "
                 "(vLLM's extension on /v1)"),
    FieldSupport("top_p", DONE, "nucleus mass in (0, 1]; 1 is off"),
    FieldSupport("seed", DONE, "the same seed gives the same text alone or under any load; "
                 "choice i of n uses a seed derived from (seed, i), reported per choice"),
    FieldSupport("stop", DONE, "up to 8 stop strings, never part of the reply"),
    FieldSupport("min_tokens", DONE, "stop strings cannot end the text before this many "
                 "characters (a character model has no end-of-text token: without stop "
                 "strings the text always runs to its length)"),
    FieldSupport("n", DONE, "choices sampled from one prefill (the state copied into n rows), "
                 "up to CHARLSTM_MAX_N; each counts as a row for admission"),
    FieldSupport("best_of", DONE, "sample best_of choices, return the n with the highest mean "
                 "log-probability per character; not with stream"),
    FieldSupport("logprobs", DONE, "per-character log-probabilities with 0 to 5 alternatives "
                 "(`details` on /generate)", v1_only=True),
    FieldSupport("echo", DONE, "the prompt is returned before the completion, with its "
                 "per-character log-probabilities (the first null) when logprobs is set, "
                 "whatever max_tokens is (0 included)", v1_only=True),
    FieldSupport("user", DONE, "accepted and ignored (a label for the caller's own logs)",
                 v1_only=True),
    FieldSupport("min_p", DONE, "drop characters less likely than min_p times the likeliest "
                 "(after temperature); 0 is off. Such rows sample on the host, one character "
                 "per call (the decode graph samples without it)"),
    FieldSupport("repetition_penalty", NEUTRAL, "over a ~65-character alphabet every common "
                 "letter repeats within a few characters, so a penalty on seen characters "
                 "degrades spelling (use a lower temperature, top_p or min_p)", 1.0),
    FieldSupport("presence_penalty", NEUTRAL, "a penalty counted per character would "
                 "penalise every common letter after a few words", 0.0),
    FieldSupport("frequency_penalty", NEUTRAL, "a penalty counted per character would "
                 "penalise every common letter after a few words", 0.0),
    FieldSupport("logit_bias", DONE, "character (on /v1 also its token id) -> additive bias "
                 "in [-100, 100] on its logit before sampling; -100 bans it"),
    FieldSupport("structured_outputs", DONE, "regex, choice, json (a JSON schema) or "
                 "json_object: the text always matches (see Constrained output); on /v1 also "
                 "guided_regex, guided_choice, guided_json and response_format"),
    FieldSupport("suffix", NEUTRAL, "a character model continues text left to right; it "
                 "cannot fill in before a suffix", None, v1_only=True),
)

BY_NAME = {f.name: f for f in FIELDS}
NEUTRAL_FIELDS = tuple(f for f in FIELDS if f.status == NEUTRAL)


def check_neutral(values: dict[str, Any]) -> None:
    """Refuse a field that is taken only at its neutral value when it holds another."""
    for f in NEUTRAL_FIELDS:
        if f.name not in values:
            continue
        v = values[f.name]
        if v is None or v == f.neutral:
            continue
        raise InvalidRequestError(
            f"{f.name} = {v!r} is not supported: {f.note}. Send {f.neutral!r} or leave it "
            "out")


def markdown_table() -> str:
    """The README's table of fields."""
    rows = ["| field | /generate | /v1/completions | what it does |",
            "|---|---|---|---|"]
    for f in FIELDS:
        where = "yes" if f.status == DONE else f"only {_shown(f.neutral)}"
        rows.append(f"| `{f.name}` | {'-' if f.v1_only else where} | {where} | {f.note} |")
    return "\n".join(rows)


def _shown(v: Any) -> str:
    return "`null`" if v is None else f"`{v!r}`"
