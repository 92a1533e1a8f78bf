"""Decode graphs at run time: K characters per row per onnxruntime call, sampled in the graph.

A decode graph (model.json `decode_graphs`, built by `python -m training decode-graph`) takes the
id each row feeds next, the recurrent state, app.sampling's per-row parameters and K uniforms
per row, and returns the K sampled ids and the new state: the logits never leave onnxruntime.
With the same uniforms it picks the ids app.sampling.sample_next picks on the host (checked
when the graph is built, recorded in its `check`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app import rng as rng_mod
from app.artifact import (
    DECODE_GRAPH_VERSION,
    ArtifactError,
    DecodeGraphSpec,
    ModelMetadata,
    read_metadata,
)
from app.runtime import OnnxModel, RuntimeOptions, choose_provider, load_model, serving_variant
from app.settings import Settings

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


@dataclass
class DecodeOutput:
    ids: npt.NDArray[np.int32]  # (B, K): the sampled ids; ids[:, -1] is fed next call
    states: list[FloatArray]  # (B, U) each: after feeding the call's K inputs
    chosen_prob: FloatArray | None = None  # (B, K), temperature 1 (with details)
    top_ids: npt.NDArray[np.int32] | None = None  # (B, K, 5)
    top_probs: FloatArray | None = None  # (B, K, 5)


class DecodeGraph:
    """One decode graph's onnxruntime session; host arrays in and out (CPU provider).

    `lean`: the same graph without its details outputs and the nodes only they need (see
    `without_details`), run when no row wants details. onnxruntime runs every node of a graph
    whatever outputs a call fetches, and the temperature-1 softmax and top-5 of every step cost
    more than the model itself for small models at large batches."""

    def __init__(self, spec: DecodeGraphSpec, meta: ModelMetadata, session: Any,
                 lean: Any = None) -> None:
        self.spec = spec
        self.steps = spec.steps
        self.details = spec.details
        self.session = session
        self.lean = lean
        self.state_in = [s.input for s in meta.onnx.states]
        self.state_sizes = [s.size for s in meta.onnx.states]
        self._outputs = [spec.ids_output, *(s.output for s in meta.onnx.states)]
        if spec.details:
            self._outputs += [spec.chosen_prob_output, spec.top_ids_output,
                              spec.top_probs_output]

    def run(self, ids: npt.NDArray[np.int32], states: list[FloatArray],
            temperature: FloatArray, top_k: npt.NDArray[np.int64],
            top_p: npt.NDArray[np.floating],
            uniforms: npt.NDArray[np.float64], details: bool | None = None,
            clamp_top_p: bool = True) -> DecodeOutput:
        """ids (B,), states (B, U)..., temperature/top_k/top_p (B,), uniforms (B, K). top_p
        goes in as float32, at least its smallest normal number: any top_p below that keeps
        only the likeliest id, as the host's float64 1e-50 does.
        details: also fetch the temperature-1 details (default: when the graph has them).
        clamp_top_p=False feeds top_p as given (the build check tests the graph at 0)."""
        s = self.spec
        feeds = {s.ids_input: np.ascontiguousarray(ids, np.int32),
                 **dict(zip(self.state_in, states, strict=True)),
                 s.temperature_input: np.ascontiguousarray(temperature, np.float32),
                 s.top_k_input: np.ascontiguousarray(top_k, np.int64),
                 # Kept above 0: graphs built before the likeliest id was always kept (in
                 # the graph) sampled id 0 for a top_p that float32 rounds to 0.
                 s.top_p_input: (np.maximum(top_p, _FLOAT32_TINY) if clamp_top_p
                                 else top_p).astype(np.float32),
                 s.uniforms_input: np.ascontiguousarray(uniforms, np.float64)}
        want = self.details if details is None else details and self.details
        n_out = len(self._outputs) if want else 1 + len(self.state_in)
        session = self.session if want or self.lean is None else self.lean
        out = session.run(self._outputs[:n_out], feeds)
        result = DecodeOutput(out[0], out[1:1 + len(self.state_in)])
        if want:
            result.chosen_prob, result.top_ids, result.top_probs = out[1 + len(self.state_in):]
        return result


def block_uniforms(keys: npt.NDArray[np.uint64], counters: npt.NDArray[np.uint64],
                   steps: int) -> npt.NDArray[np.float64]:
    """(B, K) draws: column j is what app.rng gives the host sampler at counter + j, so a
    seeded request picks the same characters with K-step graphs as one step at a time."""
    if keys.shape[0] == 1:  # one row: Python ints, one array
        return np.array([rng_mod.row_uniforms(int(keys[0]), int(counters[0]), steps)],
                        np.float64)
    # Every (row, j) at once: the same elementwise arithmetic app.rng.uniforms does per column.
    grid = counters[:, None] + np.arange(steps, dtype=np.uint64)[None, :]
    rows = np.broadcast_to(keys[:, None], grid.shape)
    return rng_mod.uniforms(rows.reshape(-1), grid.reshape(-1)).reshape(grid.shape)


def without_details(model: Any, keep: list[str]) -> Any:
    """`model` (onnx.ModelProto, topologically sorted as ONNX requires) with only the outputs
    `keep` and the nodes and initializers they need; the nodes kept are unchanged, so the
    outputs are the same. A node with subgraphs (If) needs what they read from outside."""
    graph = model.graph
    needed = set(keep)
    kept = []
    for node in reversed(graph.node):
        if not needed.intersection(node.output):
            continue
        kept.append(node)
        needed.update(node.input)
        needed.update(_subgraph_inputs(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    outputs = [o for o in graph.output if o.name in keep]
    del graph.output[:]
    graph.output.extend(outputs)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return model


def _subgraph_inputs(node: Any) -> set[str]:
    """Every tensor name the node's subgraphs (at any depth) read: a superset of what they
    read from the enclosing graph, which is all a pruning walk needs."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in [*([attr.g] if attr.HasField("g") else []), *attr.graphs]:
            for n in g.node:
                names.update(n.input)
                names.update(_subgraph_inputs(n))
            names.update(o.name for o in g.output)
    return names


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_decode_graph(model_dir: Path, meta: ModelMetadata, spec: DecodeGraphSpec,
                      options: RuntimeOptions | None = None) -> DecodeGraph:
    """Open `spec`'s graph after checking its version and that its weight file is unchanged."""
    import onnxruntime as ort

    options = options or RuntimeOptions()
    path = model_dir / spec.file
    if spec.version != DECODE_GRAPH_VERSION:
        raise ArtifactError(f"{path}: decode graph version {spec.version}, this service reads "
                            f"{DECODE_GRAPH_VERSION}; rebuild it with `python -m training "
                            "decode-graph`")
    source = model_dir / spec.source
    if not source.is_file() or _sha256(source) != spec.source_sha256:
        raise ArtifactError(f"{path}: reads its weights from {source}, which is missing or has "
                            "changed since the decode graph was built; rebuild it with "
                            "`python -m training decode-graph`")
    provider = choose_provider(options.device)
    if provider != "CPUExecutionProvider":
        # Device-resident states (IO binding) are not written for decode graphs yet.
        raise ArtifactError(f"{path}: decode graphs run on the CPU provider only for now")
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=[provider])
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt graphs
        raise ArtifactError(f"{path}: onnxruntime cannot load it: {exc}") from None
    graph = DecodeGraph(spec, meta, session)
    names_in = {i.name for i in session.get_inputs()}
    names_out = {o.name for o in session.get_outputs()}
    want_in = {spec.ids_input, *graph.state_in, spec.temperature_input, spec.top_k_input,
               spec.top_p_input, spec.uniforms_input}
    if names_in != want_in or not set(graph._outputs) <= names_out:
        raise ArtifactError(f"{path}: inputs {sorted(names_in)} and outputs {sorted(names_out)} "
                            f"are not the ones model.json describes ({sorted(want_in)}, "
                            f"{graph._outputs})")
    if spec.details:  # ids and states only: what a call fetches when no row wants details
        graph.lean = _lean_session(path, graph._outputs[:1 + len(graph.state_in)], so, provider)
    return graph


def _lean_session(path: Path, keep: list[str], so: Any, provider: str) -> Any:
    """A session of the graph at `path` reduced to the outputs `keep` (without_details), or
    None (then the full graph serves every call) when it cannot be made."""
    import onnxruntime as ort

    try:
        import onnx  # a dependency of the service; a broken install only loses speed

        # The weights come along (external data read from the source graph beside it), so
        # the reduced graph loads from memory.
        model = without_details(onnx.load(str(path)), keep)
        return ort.InferenceSession(model.SerializeToString(), sess_options=so,
                                    providers=[provider])
    except Exception as exc:  # the full graph still serves; only speed is lost
        log.warning("%s: no reduced graph without details (%s); running the full one", path,
                    exc)
        return None


def load_decode_graph(model_dir: Path, steps: int = 1, variant: str | None = None,
                      options: RuntimeOptions | None = None) -> DecodeGraph:
    """The listed decode graph with K = `steps` built from onnx.file (or `variant`'s file)."""
    meta = read_metadata(model_dir)
    source = meta.onnx.file if variant is None else meta.variant(variant).file
    for spec in meta.decode_graphs:
        if spec.steps == steps and spec.source == source:
            return open_decode_graph(model_dir, meta, spec, options)
    listed = ", ".join(f"{d.file} (K={d.steps}, from {d.source})" for d in meta.decode_graphs)
    raise ArtifactError(f"{model_dir}: no decode graph with K={steps} built from {source} "
                        f"(listed: {listed or 'none'}); add one with `python -m training "
                        f"decode-graph {model_dir} --steps {steps}`")


@dataclass
class DecodeGraphs:
    """What the engine decodes with: K characters per call, and a K = 1 graph of the same source
    for iterations that also prefill (so a seed in prefill advances one slice per character, as
    with host sampling). Both use the same in-graph sampler: the same uniforms give the same
    ids whichever runs, so a seeded request's text does not depend on when others prefill."""

    steps: DecodeGraph
    single: DecodeGraph | None  # None when K is 1 or no K = 1 graph is listed

    @property
    def files(self) -> str:
        return self.steps.spec.file


def serving_decode_graphs(model: OnnxModel, steps: int,
                          options: RuntimeOptions | None = None) -> DecodeGraphs | None:
    """The decode graphs for `model`'s served graph with K = `steps`, or None (host sampling),
    saying why in the log. A listed graph that cannot be opened stops start-up (ArtifactError):
    the folder claims something it does not hold."""
    if steps < 1:
        return None
    if model.provider != "CPUExecutionProvider":
        log.info("%s: decode graphs run on the CPU provider only; sampling on the host",
                 model.name)
        return None
    specs = {d.steps: d for d in model.meta.decode_graphs
             if d.source == model.graph_file and d.details}
    if steps not in specs:
        log.info("%s: no decode graph with K=%d built from %s (with details) in model.json; "
                 "sampling on the host (`python -m training decode-graph %s --steps %d`)",
                 model.name, steps, model.graph_file, model.dir, steps)
        return None
    main = open_decode_graph(model.dir, model.meta, specs[steps], options)
    single = (open_decode_graph(model.dir, model.meta, specs[1], options)
              if steps > 1 and 1 in specs else None)
    log.info("%s: decoding %d characters per call with %s", model.name, steps, main.spec.file)
    return DecodeGraphs(main, single)


def load_served(model_dir: Path, settings: Settings) -> tuple[OnnxModel, DecodeGraphs | None]:
    """A model folder as `settings` serve it: the graph CHARLSTM_VARIANT picks, opened and
    warmed, and its decode graphs for CHARLSTM_DECODE_STEPS. Both engine drivers (the thread
    beside `uvicorn app.main:app`, the engine process) load through here. Raises ArtifactError."""
    options = RuntimeOptions(device=settings.device, intra_op_threads=settings.intra_op_threads)
    model = load_model(model_dir, options, serving_variant(read_metadata(model_dir),
                                                           settings.device, settings.variant))
    return model, serving_decode_graphs(model, settings.decode_steps, options)
