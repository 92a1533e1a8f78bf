"""The artifact contract between `training/` and `app/`: `models/<name>/model.json`.

Training writes it next to `model.onnx`; the service validates it at start-up.
Only pydantic and the standard library here, so both sides can import it
without pulling in TensorFlow or onnxruntime.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.vocab import Normalization, Vocabulary, VocabularyError

FORMAT_VERSION = 1
METADATA_FILE = "model.json"
ONNX_FILE = "model.onnx"
# The optional sections below (`variants`, `decode_graphs`) extend format 1 without bumping it:
# a service that does not know them ignores them (extra="allow") and serves onnx.file as before,
# and model.json files written before them still load. A decode graph carries its own version,
# so its input/output contract can change without invalidating the rest of the artifact.
DECODE_GRAPH_VERSION = 1
# The largest model.json the service reads. One is a few kilobytes (its vocabulary and the
# export's facts); even a vocabulary of every Unicode code point stays under 10 MiB. A larger
# file is refused by its size, unread.
MAX_METADATA_BYTES = 16 * 2**20


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


class VariantCheck(_Strict):
    """A variant's validation loss next to the fp32 graph's, same windows, same run."""

    loss_nats: float
    reference_loss_nats: float  # onnx.file on the same windows
    max_increase_nats: float  # the variant is refused when loss > reference + this
    characters: int
    window: int


class GraphVariant(_Strict):
    """Another step graph of the same model with exactly onnx.file's inputs and outputs (for
    instance int8 weights for the CPU). Listed only after its loss check passed."""

    name: str  # what a loader asks for, e.g. "int8"
    file: str
    method: str  # how it was made from onnx.file
    validation: VariantCheck
    # Whether a row's outputs are the same alone and in any batch (app.runtime.batch_invariant,
    # measured by `quantize`); None: not measured (an older model.json). Serving it by default
    # needs True: seeded requests must give the same text under any load.
    batch_invariant: bool | None = None

    @field_validator("file")
    @classmethod
    def _plain_file(cls, v: str) -> str:
        return _plain_file_name(v)


class DecodeGraphSpec(_Strict):
    """A graph that advances each row K characters and samples them itself (app/decode.py).

    Inputs: `ids_input` (B,) int32, the id each row feeds next; the state inputs of onnx.states;
    `temperature` (B,) float32, `top_k` (B,) int64, `top_p` (B,) float32 (app.sampling's
    per-row parameters: 0 = greedy, 0 = no top-k, 1 = no top-p); `uniforms` (B, K) float64, one
    draw per row per step. Outputs: `ids_output` (B, K) int32; the state outputs of onnx.states,
    after feeding the K inputs (`ids` and the first K - 1 sampled ids; the K-th sampled id is the
    next call's input); with `details`, `chosen_prob` (B, K) float32, `top_ids` (B, K, 5) int32
    and `top_probs` (B, K, 5) float32, all at temperature 1.
    """

    version: int  # DECODE_GRAPH_VERSION when written; a loader refuses other versions
    file: str
    source: str  # the step graph it was built from (onnx.file or a variant's file)
    source_sha256: str  # its weights are read from `source`, which must be unchanged
    steps: int = Field(ge=1)  # K
    details: bool
    ids_input: str = "ids"
    temperature_input: str = "temperature"
    top_k_input: str = "top_k"
    top_p_input: str = "top_p"
    uniforms_input: str = "uniforms"
    ids_output: str = "next_ids"
    chosen_prob_output: str = "chosen_prob"
    top_ids_output: str = "top_ids"
    top_probs_output: str = "top_probs"
    check: dict[str, object] = Field(default_factory=dict)  # agreement with app.sampling

    @field_validator("file", "source")
    @classmethod
    def _plain_file(cls, v: str) -> str:
        return _plain_file_name(v)


def _plain_file_name(v: str) -> str:
    if not v or Path(v).name != v or v.startswith("."):
        raise ValueError(f"must be a plain file name in the model folder, got {v!r}")
    return v


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
    # The Unicode normalisation form the corpus was put in (app.vocab.normalize, after
    # lowercasing), which the service applies to seeds and stops too; None: the text as it was.
    normalization: Normalization | None = None
    architecture: Architecture
    onnx: OnnxSpec
    corpus: CorpusInfo
    validation: ValidationInfo | None = None
    training: dict[str, object] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    parity: dict[str, object] = Field(default_factory=dict)
    created: str = ""
    variants: list[GraphVariant] = Field(default_factory=list)
    decode_graphs: list[DecodeGraphSpec] = Field(default_factory=list)

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

    def variant(self, name: str) -> GraphVariant:
        for v in self.variants:
            if v.name == name:
                return v
        listed = ", ".join(v.name for v in self.variants) or "none"
        raise ArtifactError(f"model {self.name!r} has no {name!r} variant (listed: {listed})")

    def graph_files(self) -> list[str]:
        """Every step graph in the folder: onnx.file, then the variants' files."""
        return [self.onnx.file, *(v.file for v in self.variants)]


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


def _regular_file_stat(path: Path, models_dir: Path) -> os.stat_result | None:
    """The stat of `path` (through its links) once it is known to be a regular file inside the
    models folder; None when it is missing."""
    check_inside(path, models_dir)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be read: {exc}") from None
    _refuse_unless_regular(path, st.st_mode)
    return st


def _refuse_unless_regular(path: Path, mode: int) -> None:
    for is_kind, kind in _NOT_REGULAR:
        if is_kind(mode):
            raise ArtifactError(f"{path}: is {kind}, not a regular file")
    if not stat.S_ISREG(mode):
        raise ArtifactError(f"{path}: not a regular file")


def check_artifact_file(path: Path, models_dir: Path) -> None:
    """Refuse, without opening it, a file that leads outside the models folder or is not a
    regular file: opening a FIFO blocks until something writes to it (start-up would hang with
    no message), and a device may never end. A missing file passes, for the caller to name."""
    _regular_file_stat(path, models_dir)


def open_artifact_file(path: Path, models_dir: Path) -> int:
    """A read-only descriptor of `path`, a regular file inside the models folder, opened
    without ever blocking: the checks above run on the name, and the name can be swapped for a
    FIFO or a link between them and the open. O_NONBLOCK makes opening a FIFO return at once
    (a blocking open waits for a writer, forever), and the opened file is checked again by
    fstat: it must be the regular file that was checked. Raises FileNotFoundError when it is
    missing, ArtifactError for everything else; the caller closes the descriptor."""
    st = _regular_file_stat(path, models_dir)
    if st is None:
        raise FileNotFoundError(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be read: {exc}") from None
    try:
        opened = os.fstat(fd)
        _refuse_unless_regular(path, opened.st_mode)
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            raise ArtifactError(f"{path}: was replaced while it was being opened; "
                                "publish model folders by rename")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_artifact_file(path: Path, models_dir: Path, limit: int) -> bytes:
    """The bytes of `path`, a regular file inside the models folder, at most `limit` of them:
    a larger file is refused by its size before a byte is read (a model.json linked to a
    400 MB file would otherwise be read whole), and a file growing meanwhile is read only up
    to the limit. Raises FileNotFoundError when it is missing, ArtifactError otherwise."""
    fd = open_artifact_file(path, models_dir)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ArtifactError(f"{path}: {size} bytes, more than the {limit} bytes this "
                                "service reads from such a file")
        chunks, got = [], 0
        while got <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be read: {exc}") from None
    finally:
        os.close(fd)
    if got > limit:
        raise ArtifactError(f"{path}: grew past the {limit} bytes this service reads from such "
                            "a file while it was being read")
    return b"".join(chunks)


def copy_artifact_file(src: Path, dest: Path, models_dir: Path) -> None:
    """Copy `src` (a regular file inside the models folder, opened as open_artifact_file does,
    so never blocking) to `dest`, with its times and mode."""
    fd = open_artifact_file(src, models_dir)
    with os.fdopen(fd, "rb") as f_in, dest.open("xb") as f_out:
        shutil.copyfileobj(f_in, f_out, 1 << 20)
        st = os.fstat(fd)
    os.chmod(dest, stat.S_IMODE(st.st_mode))
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))


def read_metadata(model_dir: Path) -> ModelMetadata:
    """Parse and validate `model_dir/model.json`, or raise ArtifactError naming the file.
    The folder holding `model_dir` is the models folder that its files must stay inside."""
    path = model_dir / METADATA_FILE
    try:
        raw = read_artifact_file(path, model_dir.parent, MAX_METADATA_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ArtifactError(
            f"{path}: missing (every model folder needs a {METADATA_FILE})") from None
    except UnicodeDecodeError as exc:
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
    """Replace model.json in one rename, so a server starting meanwhile reads the old file or
    the new one, never half of one (quantize, decode-graph and evaluate --update rewrite it in
    folders that may be served)."""
    path = model_dir / METADATA_FILE
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=f".{METADATA_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(meta.model_dump_json(indent=2) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the service often runs as another user
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def check_model_name(name: str) -> None:
    """A model is a folder of the models folder: a plain name, not hidden (names starting with
    "." are exports in progress, which the service ignores)."""
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"model name must be a plain folder name not starting with '.', "
                         f"got {name!r}")


def publish_folder(work: Path, target: Path) -> None:
    """Move a finished model folder `work` (a hidden sibling of `target`, ".<name>.*", which
    the service never looks at) into place as `target`, replacing whatever is there. Each step
    is a rename, so the service sees the old folder or the new one, whole: the old one is
    renamed aside (hidden) first, the new one renamed in, then the old one deleted. Between the
    two renames the name is missing for microseconds; a reload round that looks just then
    waits (app/reload.py) before treating a folder as removed."""
    if work.parent != target.parent or not work.name.startswith("."):
        raise ValueError(f"{work} must be a hidden folder beside {target}")
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    try:
        work.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)  # put the old model back: nothing was published
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
