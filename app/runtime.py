"""Loader: a validated artifact folder -> an onnxruntime session with a typed step function.

`OnnxModel.step` advances a batch by T characters. The recurrent state lives in a
`StateBatch`: numpy arrays on the CPU provider, device-resident OrtValues on CUDA (IO
binding), so that only the logits cross to the host on every step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app.artifact import ArtifactError, ModelMetadata, check_artifact_file, read_metadata
from app.vocab import Vocabulary

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int32]


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto | cpu | cuda
    intra_op_threads: int = 1  # 0 lets onnxruntime choose; 1 is fastest at small batches
    inter_op_threads: int = 1


class StateBatch:
    """Per-row recurrent state, one (B, U) tensor per state input, on the host or the device."""

    def __init__(self, tensors: list[Any], rows: int, on_device: bool) -> None:
        self.tensors = tensors  # numpy arrays, or OrtValues when on_device
        self.rows = rows
        self.on_device = on_device

    def host(self) -> list[FloatArray]:
        if self.on_device:
            return [t.numpy() for t in self.tensors]
        return list(self.tensors)


class OnnxModel:
    """One exported model: metadata, vocabulary and an onnxruntime session."""

    def __init__(self, model_dir: Path, meta: ModelMetadata, session: Any, provider: str,
                 graph_file: str | None = None) -> None:
        self.dir = model_dir
        self.meta = meta
        self.name = model_dir.name
        self.vocab: Vocabulary = meta.vocabulary()
        self.session = session
        self.provider = provider
        self.graph_file = graph_file or meta.onnx.file  # or a variant's (load_model's `variant`)
        self.on_device = provider == "CUDAExecutionProvider"
        self.ids_name = meta.onnx.ids_input
        self.logits_name = meta.onnx.logits_output
        self.state_in = [s.input for s in meta.onnx.states]
        self.state_out = [s.output for s in meta.onnx.states]
        self.state_sizes = [s.size for s in meta.onnx.states]
        self._outputs = [self.logits_name, *self.state_out]

    # --- state helpers -------------------------------------------------------------------
    def zero_states(self, rows: int) -> StateBatch:
        return self.states_from_host([np.zeros((rows, n), np.float32) for n in self.state_sizes])

    def states_from_host(self, arrays: list[FloatArray]) -> StateBatch:
        rows = int(arrays[0].shape[0]) if arrays else 0
        if not self.on_device:
            return StateBatch(arrays, rows, on_device=False)
        import onnxruntime as ort

        vals = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", 0)
                for a in arrays]
        return StateBatch(vals, rows, on_device=True)

    def states_to_host(self, states: StateBatch) -> list[FloatArray]:
        return states.host()

    def select(self, states: StateBatch, rows: npt.NDArray[np.intp]) -> StateBatch:
        """Keep only `rows` (in that order); the batch shrinks when requests leave."""
        host = [a[rows] for a in states.host()]
        return self.states_from_host(host)

    def concat(self, parts: list[StateBatch]) -> StateBatch:
        """Stack batches row-wise; new requests join the running batch this way."""
        parts = [p for p in parts if p.rows]
        if not parts:
            return self.zero_states(0)
        if len(parts) == 1:
            return parts[0]
        hosts = [p.host() for p in parts]
        return self.states_from_host(
            [np.concatenate([h[i] for h in hosts]) for i in range(len(self.state_in))]
        )

    # --- the step ------------------------------------------------------------------------
    def step(self, ids: IdArray, states: StateBatch) -> tuple[FloatArray, StateBatch]:
        """ids (B, T) -> logits (B, T, V) on the host, and the new state (same placement)."""
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        if not self.on_device:
            feeds = {self.ids_name: ids, **dict(zip(self.state_in, states.tensors, strict=True))}
            out = self.session.run(self._outputs, feeds)
            return out[0], StateBatch(out[1:], ids.shape[0], on_device=False)
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.ids_name, ids)
        for name, val in zip(self.state_in, states.tensors, strict=True):
            binding.bind_ortvalue_input(name, val)
        binding.bind_output(self.logits_name, "cpu")
        for name in self.state_out:
            binding.bind_output(name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        out = binding.get_outputs()
        return out[0].numpy(), StateBatch(list(out[1:]), ids.shape[0], on_device=True)

    def run_numpy(self, ids: IdArray, states: list[FloatArray]) -> tuple[FloatArray,
                                                                        list[FloatArray]]:
        """Host-only convenience for offline tools (evaluate, sample, parity checks)."""
        logits, new = self.step(ids, self.states_from_host(states))
        return logits, new.host()


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels that the `gpu` extra installs, so no
    LD_LIBRARY_PATH is needed; a system CUDA install is used when they are absent."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # best effort: the provider reports what is still missing
            log.warning("could not preload CUDA libraries from site-packages: %s", exc)


def choose_provider(device: str) -> str:
    providers = available_providers()
    if device == "cpu":
        return "CPUExecutionProvider"
    if "CUDAExecutionProvider" in providers:
        _preload_cuda_libraries()
        return "CUDAExecutionProvider"
    if device == "cuda":
        raise ArtifactError(
            "device=cuda was requested but onnxruntime has no CUDA provider "
            f"(available: {', '.join(providers)}); install the gpu extra"
        )
    return "CPUExecutionProvider"


def _check_graph(path: Path, meta: ModelMetadata, session: Any) -> None:
    """The graph's inputs and outputs must be the ones model.json promises."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    want_in = [meta.onnx.ids_input, *(s.input for s in meta.onnx.states)]
    want_out = [meta.onnx.logits_output, *(s.output for s in meta.onnx.states)]
    missing_in = [n for n in want_in if n not in inputs]
    missing_out = [n for n in want_out if n not in outputs]
    if missing_in or missing_out or len(inputs) != len(want_in):
        raise ArtifactError(
            f"{path}: graph does not match model.json: graph inputs {sorted(inputs)}, outputs "
            f"{sorted(outputs)}; model.json expects inputs {want_in} and outputs {want_out}"
        )
    for s in meta.onnx.states:
        shape = inputs[s.input].shape
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != s.size):
            raise ArtifactError(
                f"{path}: state input {s.input!r} has shape {shape}, model.json says "
                f"[batch, {s.size}]"
            )
    vshape = outputs[meta.onnx.logits_output].shape
    if len(vshape) != 3 or (isinstance(vshape[2], int) and vshape[2] != len(meta.vocab)):
        raise ArtifactError(
            f"{path}: logits shape {vshape} does not match the vocabulary of {len(meta.vocab)} "
            "characters in model.json"
        )


def serving_variant(meta: ModelMetadata, device: str, choice: str) -> str | None:
    """Which graph to serve: "fp32" is model.onnx; "int8" the variant (refused if model.json
    lists none); "auto" the int8 variant on the CPU only when it was found batch-invariant at
    quantize time (`batch_invariant`), model.onnx otherwise (CUDA runs fp32).

    Batch invariance is what lets a seeded request give the same text under any load. The
    int8 variant onnxruntime's dynamic quantization makes is not: it quantizes activations
    with one scale taken over the whole batch, so a row's logits move with its neighbours
    (measured on models/shakespeare: up to 0.05), and `auto` leaves it to those who ask."""
    listed = {v.name: v for v in meta.variants}
    if choice == "fp32":
        return None
    if choice == "int8":
        if "int8" not in listed:
            raise ArtifactError(f"{meta.name}: CHARLSTM_VARIANT=int8, but model.json lists no "
                                "int8 variant (add one with `python -m training quantize`)")
        return "int8"
    on_cpu = choose_provider(device) == "CPUExecutionProvider"
    int8 = listed.get("int8")
    return "int8" if on_cpu and int8 is not None and int8.batch_invariant is True else None


def batch_invariant(model: OnnxModel, rows: int = 8, steps: int = 3) -> bool:
    """True when every row's logits and states are bitwise the same computed alone as beside
    other rows, for one-character steps and for `steps`-character slices (decode and prefill).
    Rows get states of different magnitudes, so a batch-wide statistic cannot hide."""
    rng = np.random.default_rng(0)
    for t in (1, steps):
        ids = rng.integers(0, len(model.vocab), (rows, t)).astype(np.int32)
        scale = np.linspace(0.1, 1.0, rows, dtype=np.float32)[:, None]
        states = [(rng.uniform(-1, 1, (rows, n)) * scale).astype(np.float32)
                  for n in model.state_sizes]
        together, after = model.run_numpy(ids, states)
        for i in range(rows):
            alone, alone_after = model.run_numpy(ids[i:i + 1], [s[i:i + 1] for s in states])
            if not (np.array_equal(alone[0], together[i]) and all(
                    np.array_equal(a[0], b[i]) for a, b in zip(alone_after, after,
                                                               strict=True))):
                return False
    return True


def load_model(model_dir: Path, options: RuntimeOptions | None = None,
               variant: str | None = None) -> OnnxModel:
    """Validate metadata, open the graph, check it against the metadata, run one warm-up step.

    variant: a name from model.json's `variants` (e.g. "int8") to open that graph instead of
    onnx.file; it has the same inputs and outputs, so the rest is the same.
    """
    meta = read_metadata(model_dir)
    graph_file = meta.onnx.file if variant is None else meta.variant(variant).file
    return open_step_graph(model_dir, meta, graph_file, options)


def check_graph_file(model_dir: Path, graph_file: str, field: str = "onnx.file") -> Path:
    """The checks that need no onnxruntime session (the supervisor runs them before starting
    anything): a plain name, a regular file inside the models folder."""
    onnx_path = model_dir / graph_file
    if Path(graph_file).name != graph_file:
        raise ArtifactError(f"{model_dir / 'model.json'}: {field} must be a plain file name, "
                            f"got {graph_file!r}")
    check_artifact_file(onnx_path, model_dir.parent)
    if not onnx_path.is_file():
        raise ArtifactError(f"{onnx_path}: missing (named by {model_dir / 'model.json'})")
    return onnx_path


def open_step_graph(model_dir: Path, meta: ModelMetadata, graph_file: str,
                    options: RuntimeOptions | None = None) -> OnnxModel:
    """load_model for a graph file model.json does not list yet (a variant being checked)."""
    import onnxruntime as ort

    options = options or RuntimeOptions()
    onnx_path = check_graph_file(model_dir, graph_file,
                                 "onnx.file" if graph_file == meta.onnx.file else "a variant file")
    provider = choose_provider(options.device)
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.log_severity_level = 3
    providers = [provider] if provider == "CPUExecutionProvider" else [provider,
                                                                       "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt graphs
        raise ArtifactError(f"{onnx_path}: onnxruntime cannot load it: {exc}") from None
    if options.device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime falls back to the CPU silently; a forced device must fail loudly instead.
        raise ArtifactError(
            f"{onnx_path}: device=cuda, but onnxruntime could not start its CUDA provider "
            "(NVIDIA driver >= 580 for CUDA 13? GPU visible to this process?)")
    _check_graph(onnx_path, meta, session)
    model = OnnxModel(model_dir, meta, session, session.get_providers()[0], graph_file)
    try:
        logits, _ = model.step(np.zeros((1, 2), np.int32), model.zero_states(1))
    except Exception as exc:
        raise ArtifactError(f"{onnx_path}: warm-up step failed: {exc}") from None
    if logits.shape != (1, 2, len(model.vocab)) or not np.all(np.isfinite(logits)):
        raise ArtifactError(f"{onnx_path}: warm-up step gave logits of shape {logits.shape} "
                            "or non-finite values")
    log.info("loaded model %s from %s on %s (pid %d)", model.name, onnx_path, model.provider,
             os.getpid())
    return model
