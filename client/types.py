"""Replies of the service as typed, immutable values (parsed from JSON; extra fields ignored)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

FinishReason = Literal["length", "stop", "time_limit", "cancelled", "error"]


@dataclass(frozen=True, slots=True)
class Usage:
    seed_chars: int
    generated_chars: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Usage:
        return cls(seed_chars=int(data["seed_chars"]),
                   generated_chars=int(data["generated_chars"]))


@dataclass(frozen=True, slots=True)
class Timings:
    """Milliseconds spent by the server on each phase of one request."""

    queue_ms: float
    prefill_ms: float
    first_char_ms: float
    decode_ms: float
    total_ms: float

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Timings:
        return cls(queue_ms=float(data["queue_ms"]), prefill_ms=float(data["prefill_ms"]),
                   first_char_ms=float(data["first_char_ms"]),
                   decode_ms=float(data["decode_ms"]), total_ms=float(data["total_ms"]))


@dataclass(frozen=True, slots=True)
class Alternative:
    char: str
    prob: float


@dataclass(frozen=True, slots=True)
class CharDetail:
    """One generated character, its probability and the likeliest alternatives at that step."""

    char: str
    prob: float
    top: tuple[Alternative, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CharDetail:
        return cls(char=str(data["char"]), prob=float(data["prob"]),
                   top=tuple(Alternative(str(a["char"]), float(a["prob"]))
                             for a in data.get("top", ())))


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The reply of POST /generate, or the `done` summary of a stream."""

    model: str
    text: str
    finish_reason: FinishReason
    seed: int  # pass it back with the same parameters to get the same text
    seed_text: str  # the seed as the model saw it (lowercased for lowercase models)
    lowercased: bool
    usage: Usage
    timings: Timings
    error: str | None = None
    details: tuple[CharDetail, ...] | None = None
    # With resumable=True: a handle for Client.resume, which goes on exactly as one longer
    # request would have.
    continuation: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GenerationResult:
        details = data.get("details")
        return cls(
            model=str(data["model"]), text=str(data["text"]),
            finish_reason=cast(FinishReason, data["finish_reason"]), seed=int(data["seed"]),
            seed_text=str(data["seed_text"]), lowercased=bool(data["lowercased"]),
            usage=Usage.from_json(data["usage"]), timings=Timings.from_json(data["timings"]),
            error=data.get("error"),
            details=None if details is None else tuple(CharDetail.from_json(d) for d in details),
            continuation=data.get("continuation"),
        )


@dataclass(frozen=True, slots=True)
class ModelInfo:
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

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelInfo:
        loss, bits = data.get("validation_loss_nats"), data.get("validation_bits_per_char")
        return cls(
            name=str(data["name"]), cell=str(data["cell"]), layers=int(data["layers"]),
            units=int(data["units"]), embedding_dim=int(data["embedding_dim"]),
            parameters=int(data["parameters"]), vocab_size=int(data["vocab_size"]),
            lowercase=bool(data["lowercase"]), provider=str(data["provider"]),
            validation_loss_nats=None if loss is None else float(loss),
            validation_bits_per_char=None if bits is None else float(bits),
            corpus=str(data.get("corpus", "")),
        )


@dataclass(frozen=True, slots=True)
class ModelList:
    """The reply of GET /models: the model used when a request names none, and all of them."""

    default: str
    models: tuple[ModelInfo, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelList:
        return cls(default=str(data["default"]),
                   models=tuple(ModelInfo.from_json(m) for m in data["models"]))

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]
