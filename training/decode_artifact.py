"""`decode-graph`: add decode graphs (training/decode_graph.py) to a model folder, checked first.

Each graph is built from a step graph already in the folder (model.onnx or a variant), checked
against that graph with app/sampling.py on the host (same rows, parameters and uniforms), and
listed in model.json under `decode_graphs` only when the check passes. Runs at export and on
any existing folder, without TensorFlow.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app import rng as rng_mod
from app.artifact import (
    DECODE_GRAPH_VERSION,
    DecodeGraphSpec,
    ModelMetadata,
    read_metadata,
    write_metadata,
)
from app.decode import DecodeGraph, open_decode_graph
from app.runtime import OnnxModel, RuntimeOptions, load_model
from app.sampling import sample_next, softmax
from training.decode_graph import (
    TOP_ALTERNATIVES,
    DecodeGraphError,
    build_decode_graph,
    externalise_weights,
)

DEFAULT_STEPS = (1, 8)
CHECK_ROWS = 1024
MIN_AGREEMENT = 0.999  # sampled rows; greedy rows must all agree
PROB_TOLERANCE = 1e-5  # float32 softmax, onnxruntime vs numpy
STATE_TOLERANCE = 1e-5


def decode_file(steps: int, variant: str | None) -> str:
    return f"decode.{variant}.k{steps}.onnx" if variant else f"decode.k{steps}.onnx"


def add_decode_graphs(model_dir: Path, steps: tuple[int, ...] = DEFAULT_STEPS,
                      variant: str | None = None, details: bool = True) -> list[DecodeGraphSpec]:
    """Build, check, write and list one decode graph per K in `steps` for the step graph
    model.onnx (variant None) or a listed variant; raise DecodeGraphError when one fails."""
    import onnx

    meta = read_metadata(model_dir)
    source = meta.onnx.file if variant is None else meta.variant(variant).file
    source_bytes = (model_dir / source).read_bytes()
    step_graph = onnx.load_from_string(source_bytes)
    reference = load_model(model_dir, RuntimeOptions(device="cpu"), variant=variant)
    specs = []
    for k in steps:
        spec = DecodeGraphSpec(version=DECODE_GRAPH_VERSION, file=decode_file(k, variant),
                               source=source,
                               source_sha256=hashlib.sha256(source_bytes).hexdigest(),
                               steps=k, details=details)
        graph = build_decode_graph(step_graph, meta, spec)
        externalise_weights(graph, source_bytes, source)
        path = model_dir / spec.file
        partial = model_dir / f".{spec.file}.partial"
        try:
            partial.write_bytes(graph.SerializeToString())
            # The graph's external data names `source`, read relative to the graph's own folder.
            decoder = open_decode_graph(model_dir, meta, spec.model_copy(
                update={"file": partial.name}), RuntimeOptions(device="cpu"))
            check = check_against_host(decoder, reference, k)
            partial.replace(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        spec = spec.model_copy(update={"check": check})
        specs.append(spec)
        print(f"{meta.name}: {spec.file} ({path.stat().st_size:,} bytes, weights read from "
              f"{source}): {check['identical_rows']}/{check['rows']} rows identical to the host "
              f"sampler over {k} step(s), greedy {check['greedy_identical']}/"
              f"{check['greedy_rows']}")
    meta = read_metadata(model_dir)  # unchanged since, but take the file as it is now
    files = {s.file for s in specs}
    write_metadata(model_dir, meta.model_copy(update={
        "decode_graphs": [*(d for d in meta.decode_graphs if d.file not in files), *specs]}))
    return specs


def check_rows(meta: ModelMetadata, rows: int, seed: int) -> dict[str, Any]:
    """Random per-row parameters mixing every sampler path: greedy, near-greedy and hot
    temperatures, top-k off / 1 / small / above the vocabulary, top-p off / loose / tight /
    below float32's range."""
    rng = np.random.default_rng(seed)
    vocab = len(meta.vocab)
    return {
        "temperature": rng.choice([0.0, 0.0, 0.05, 0.3, 0.7, 1.0, 1.0, 1.5, 3.0],
                                  rows).astype(np.float32),
        "top_k": rng.choice([0, 0, 0, 1, 3, 10, vocab + 5], rows).astype(np.int64),
        # 0.0: a top_p float32 cannot hold (1e-50), fed unclamped: the graph itself must keep
        # the likeliest id, as the host does (DecodeGraph.run also keeps top_p above 0).
        "top_p": rng.choice([1.0, 1.0, 1.0, 0.95, 0.7, 0.3, 1e-4, 0.0],
                            rows).astype(np.float32),
        "keys": rng_mod.row_keys(rng.integers(0, 2**62, rows)),
        "prime": rng.integers(0, vocab, (rows, 12)).astype(np.int32),  # context for the states
        "ids": rng.integers(0, vocab, rows).astype(np.int32),
    }


def host_decode(model: OnnxModel, ids: npt.NDArray[np.int32], states: list[Any],
                params: dict[str, Any], uniforms: npt.NDArray[np.float64]
                ) -> tuple[npt.NDArray[np.int64], list[Any], list[Any]]:
    """What the engine does today, K steps: step graph, then app.sampling on the host.
    Returns ids (B, K), the states after the K inputs, and the T = 1 probabilities per step."""
    picked, probs = [], []
    for j in range(uniforms.shape[1]):
        logits, states = model.run_numpy(ids[:, None], states)
        last = logits[:, -1, :]
        nxt = sample_next(last, params["temperature"], params["top_k"], params["top_p"],
                          uniforms[:, j])
        picked.append(nxt)
        probs.append(softmax(last))
        ids = nxt.astype(np.int32)
    return np.stack(picked, axis=1), states, probs


def check_against_host(decoder: DecodeGraph, model: OnnxModel, steps: int,
                       rows: int = CHECK_ROWS, seed: int = 0) -> dict[str, object]:
    """Same rows, parameters and uniforms through the decode graph and through the host path;
    raise DecodeGraphError unless greedy rows all agree and sampled rows agree >= 99.9%."""
    p = check_rows(model.meta, rows, seed)
    zeros = [np.zeros((rows, n), np.float32) for n in model.state_sizes]
    _, states = model.run_numpy(p["prime"], zeros)
    counters = np.zeros(rows, np.uint64)
    uniforms = np.stack([rng_mod.uniforms(p["keys"], counters + np.uint64(j))
                         for j in range(steps)], axis=1)  # (B, K)
    out = decoder.run(p["ids"], states, p["temperature"], p["top_k"], p["top_p"], uniforms,
                      clamp_top_p=False)
    want_ids, want_states, want_probs = host_decode(model, p["ids"], states, p, uniforms)
    same = np.all(out.ids == want_ids, axis=1)  # (B,)
    greedy = p["temperature"] == 0
    state_diff = max((float(np.abs(a[same] - b[same]).max()) if same.any() else 0.0)
                     for a, b in zip(out.states, want_states, strict=True))
    check: dict[str, object] = {
        "rows": rows, "steps": steps, "identical_rows": int(same.sum()),
        "greedy_rows": int(greedy.sum()), "greedy_identical": int(same[greedy].sum()),
        "max_abs_state": state_diff,
    }
    if out.chosen_prob is not None and out.top_probs is not None and out.top_ids is not None:
        prob_diff = 0.0
        top_same = compared = 0
        for j in range(steps):
            ok = np.all(out.ids[:, : j + 1] == want_ids[:, : j + 1], axis=1)
            host = want_probs[j][ok]  # (R, V)
            chosen = np.take_along_axis(host, want_ids[ok, j, None], axis=1)[:, 0]
            top = -np.sort(-host, axis=1)[:, :TOP_ALTERNATIVES]
            prob_diff = max(prob_diff, float(np.abs(out.chosen_prob[ok, j] - chosen).max()),
                            float(np.abs(out.top_probs[ok, j] - top).max()))
            host_top = np.argsort(-host, axis=1, kind="stable")[:, :TOP_ALTERNATIVES]
            top_same += int(np.all(out.top_ids[ok, j] == host_top, axis=1).sum())
            compared += int(ok.sum())
        # Top ids can differ only where two probabilities tie in float32 (the engine's own
        # argsort breaks ties arbitrarily), so they are counted, not required.
        check["max_abs_prob"] = prob_diff
        check["detail_rows"] = compared
        check["top_ids_identical"] = top_same
    if check["greedy_identical"] != check["greedy_rows"]:
        raise DecodeGraphError(f"decode graph (K={steps}) and the host disagree on "
                               f"{int(greedy.sum() - same[greedy].sum())} greedy rows")
    if same.mean() < MIN_AGREEMENT:
        raise DecodeGraphError(f"decode graph (K={steps}) agrees with the host sampler on "
                               f"{same.mean():.2%} of rows, below {MIN_AGREEMENT:.1%}")
    if state_diff > STATE_TOLERANCE:
        raise DecodeGraphError(f"decode graph (K={steps}) states differ from the step graph's "
                               f"by {state_diff:.2e}")
    if float(check.get("max_abs_prob", 0.0)) > PROB_TOLERANCE:  # type: ignore[arg-type]
        raise DecodeGraphError(f"decode graph (K={steps}) details differ from the host's "
                               f"softmax by {check['max_abs_prob']:.2e}")
    return check
