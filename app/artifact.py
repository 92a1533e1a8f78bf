"""The artifact contract between `training/` and `app/`: `models/<name>/model.json`.

Training writes it next to `model.onnx`; the service validates it at start-up.
Only pydantic and the standard library here, so both sides can import it
without pulling in TensorFlow or onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.vocab import Vocabulary, VocabularyError

FORMAT_VERSION = 1
METADATA_FILE = "model.json"
ONNX_FILE = "model.onnx"


class ArtifactError(Exception):
    """An artifact that cannot be served; the message names the file and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Architecture(_Strict):
    cell: Literal["lstm", "gru"]
    layers: int = Field(ge=1)
    units: int = Field(ge=1)
    embedding_dim: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)
    parameters: int = Field(ge=1)

    @property
    def states_per_layer(self) -> int:
        return 2 if self.cell == "lstm" else 1


class StateSpec(_Strict):
    """One recurrent state tensor: fed as `input`, read back as `output`, shape [batch, size]."""

    input: str
    output: str
    size: int = Field(ge=1)


class OnnxSpec(_Strict):
    file: str = ONNX_FILE
    opset: int
    ids_input: str  # int32 [batch, time]
    logits_output: str  # float32 [batch, time, vocab]
    states: list[StateSpec]  # per layer: h (and c for LSTM), in layer order


class CorpusInfo(_Strict):
    name: str
    files: list[str]
    sha256: str
    characters: int


class LossMeasure(_Strict):
    """Validation loss under one way of feeding the text (`python -m training evaluate`)."""

    label: str
    window: int  # characters per zero-state window; the whole text for the carried-state pass
    characters: int  # targets scored
    loss_nats: float
    bits_per_char: float


class ValidationInfo(_Strict):
    fraction: float
    characters: int
    window: int
    loss_nats: float
    bits_per_char: float
    # Keyed "training_windows", "windows_256", "carried_state"; empty in older model.json files.
    measures: dict[str, LossMeasure] = Field(default_factory=dict)


class ModelMetadata(_Strict):
    format_version: int
    name: str
    vocab: list[str]
    lowercase: bool
    architecture: Architecture
    onnx: OnnxSpec
    corpus: CorpusInfo
    validation: ValidationInfo | None = None
    training: dict[str, object] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    parity: dict[str, object] = Field(default_factory=dict)
    created: str = ""

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(
                f"format_version {v} is not supported (this service reads {FORMAT_VERSION})")
        return v

    @field_validator("vocab")
    @classmethod
    def _valid_vocab(cls, v: list[str]) -> list[str]:
        try:
            Vocabulary(v)
        except VocabularyError as exc:
            raise ValueError(str(exc)) from exc
        return v

    def vocabulary(self) -> Vocabulary:
        return Vocabulary(self.vocab)


def read_metadata(model_dir: Path) -> ModelMetadata:
    """Parse and validate `model_dir/model.json`, or raise ArtifactError naming the file."""
    path = model_dir / METADATA_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(
            f"{path}: missing (every model folder needs a {METADATA_FILE})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: cannot be read: {exc}") from None
    try:
        meta = ModelMetadata.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise ArtifactError(f"{path}: invalid model metadata: {problems}") from None
    n_states = meta.architecture.layers * meta.architecture.states_per_layer
    if len(meta.onnx.states) != n_states:
        raise ArtifactError(
            f"{path}: a {meta.architecture.layers}-layer {meta.architecture.cell.upper()} has "
            f"{n_states} state tensors, but onnx.states lists {len(meta.onnx.states)}"
        )
    return meta


def write_metadata(model_dir: Path, meta: ModelMetadata) -> Path:
    path = model_dir / METADATA_FILE
    path.write_text(meta.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path
