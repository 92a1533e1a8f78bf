"""The artifact contract between `training/` and `app/`: `models/<name>/model.json`.

Training writes it next to `model.onnx`; the service validates it at start-up.
Only pydantic and the standard library here, so both sides can import it
without pulling in TensorFlow or onnxruntime.
"""

from __future__ import annotations

import stat
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


class ValidationInfo(_Strict):
    fraction: float
    characters: int
    window: int
    loss_nats: float
    bits_per_char: float


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


_NOT_REGULAR = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device")]


def check_inside(path: Path, models_dir: Path) -> None:
    """Refuse a path that leads, through links, outside the models folder: the service would
    otherwise serve whatever a link points at, and say nothing."""
    try:
        resolved, root = path.resolve(), models_dir.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a loop of links (Python < 3.13)
        raise ArtifactError(f"{path}: cannot resolve its links: {exc}") from None
    if not resolved.is_relative_to(root):
        raise ArtifactError(f"{path}: a link to {resolved}, outside the models folder {root}; "
                            "copy it in, or link only within the folder")


def check_artifact_file(path: Path, models_dir: Path) -> None:
    """Refuse, without opening it, a file that leads outside the models folder or is not a
    regular file: opening a FIFO blocks until something writes to it (start-up would hang with
    no message), and a device may never end. A missing file passes, for the caller to name."""
    check_inside(path, models_dir)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be read: {exc}") from None
    for is_kind, kind in _NOT_REGULAR:
        if is_kind(mode):
            raise ArtifactError(f"{path}: is {kind}, not a regular file")
    if not stat.S_ISREG(mode):
        raise ArtifactError(f"{path}: not a regular file")


def read_metadata(model_dir: Path) -> ModelMetadata:
    """Parse and validate `model_dir/model.json`, or raise ArtifactError naming the file.
    The folder holding `model_dir` is the models folder that its files must stay inside."""
    path = model_dir / METADATA_FILE
    check_artifact_file(path, model_dir.parent)
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
