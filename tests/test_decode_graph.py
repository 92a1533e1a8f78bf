"""Decode graphs: in-graph sampling equals app.sampling on the host, K steps per call equal K
single steps, the details equal the engine's, and the artifact refuses stale weights.

Tolerance for sampled rows (documented in training/decode_graph.py): the graph computes in
float64 as the host does, with the same sequential cumulative sums and comparisons; exp and
the normalising sum may differ from numpy's in the last bit, which moves a draw only when
u * total lies within ~1e-16 of a CDF step. So: greedy rows must all be identical, sampled rows
>= 99.9% (in practice every row is).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from app import rng as rng_mod
from app.artifact import ArtifactError, read_metadata
from app.decode import DecodeGraph, block_uniforms, load_decode_graph
from app.runtime import OnnxModel, RuntimeOptions, load_model
from app.sampling import sample_next, softmax
from tests.conftest import ROOT
from training.decode_artifact import check_rows, host_decode

CPU = RuntimeOptions(device="cpu")


@pytest.fixture(scope="module")
def tiny(tiny_models: Path) -> tuple[OnnxModel, DecodeGraph, DecodeGraph]:
    model_dir = tiny_models / "tiny"
    return (load_model(model_dir, CPU), load_decode_graph(model_dir, 1, options=CPU),
            load_decode_graph(model_dir, 8, options=CPU))


def primed_states(model: OnnxModel, prime: np.ndarray) -> list[np.ndarray]:
    zeros = [np.zeros((prime.shape[0], n), np.float32) for n in model.state_sizes]
    return model.run_numpy(prime, zeros)[1]


def test_export_lists_checked_decode_graphs(tiny_models: Path) -> None:
    meta = read_metadata(tiny_models / "tiny")
    assert [(d.file, d.steps, d.source) for d in meta.decode_graphs] == [
        ("decode.k1.onnx", 1, "model.onnx"), ("decode.k8.onnx", 8, "model.onnx")]
    for d in meta.decode_graphs:
        assert d.check["greedy_identical"] == d.check["greedy_rows"]
        assert d.check["identical_rows"] == d.check["rows"]
        # Weights are read from model.onnx, not copied: no large tensor is stored inline.
        graph = onnx.load(str(tiny_models / "tiny" / d.file), load_external_data=False).graph
        external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert {e.value for t in external for e in t.external_data if e.key == "location"} == {
            "model.onnx"}
        assert max(len(t.raw_data) for t in graph.initializer) < 1024
        assert sum(int(np.prod(t.dims)) for t in external) * 4 > 0.9 * (
            tiny_models / "tiny" / "model.onnx").stat().st_size


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_in_graph_sampling_equals_host_sampling(tiny: tuple[OnnxModel, DecodeGraph, DecodeGraph],
                                                seed: int) -> None:
    model, k1, _ = tiny
    rows = 6000
    p = check_rows(model.meta, rows, seed)
    # Extremes on top of the mix: near-zero temperature, a single-id nucleus, top-k = V.
    vocab = len(model.vocab)
    p["temperature"][:50] = 1e-3
    p["top_p"][50:100] = 1e-7
    p["top_k"][100:150] = vocab
    states = primed_states(model, p["prime"])
    u = block_uniforms(p["keys"], np.zeros(rows, np.uint64), 1)  # (B, 1)
    out = k1.run(p["ids"], states, p["temperature"], p["top_k"], p["top_p"], u)

    logits, want_states = model.run_numpy(p["ids"][:, None], states)
    want = sample_next(logits[:, -1], p["temperature"], p["top_k"], p["top_p"], u[:, 0])
    greedy = p["temperature"] == 0
    assert greedy.sum() > 500
    assert np.array_equal(out.ids[greedy, 0], want[greedy])
    assert np.mean(out.ids[:, 0] == want) >= 0.999
    for a, b in zip(out.states, want_states, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_single_rows_equal_the_hosts_one_row_path(tiny: tuple[OnnxModel, DecodeGraph,
                                                               DecodeGraph]) -> None:
    """Batch 1 unfiltered takes app.sampling's separate fast path on the host."""
    model, k1, _ = tiny
    p = check_rows(model.meta, 200, seed=9)
    states = primed_states(model, p["prime"])
    same = 0
    for i in range(200):
        t = np.array([max(float(p["temperature"][i]), 0.5)], np.float32)
        no_k, no_p = np.zeros(1, np.int64), np.ones(1, np.float32)
        u = rng_mod.uniforms(p["keys"][i:i + 1], np.zeros(1, np.uint64))
        row = [s[i:i + 1] for s in states]
        out = k1.run(p["ids"][i:i + 1], row, t, no_k, no_p, u[:, None])
        logits, _ = model.run_numpy(p["ids"][i:i + 1, None], row)
        same += int(out.ids[0, 0] == sample_next(logits[:, -1], t, no_k, no_p, u)[0])
    assert same >= 199


def test_k_step_graph_equals_k_single_steps(tiny: tuple[OnnxModel, DecodeGraph, DecodeGraph]
                                            ) -> None:
    model, k1, k8 = tiny
    rows = 500
    p = check_rows(model.meta, rows, seed=4)
    states = primed_states(model, p["prime"])
    u = block_uniforms(p["keys"], np.zeros(rows, np.uint64), 8)  # (B, 8)
    block = k8.run(p["ids"], states, p["temperature"], p["top_k"], p["top_p"], u)

    ids, carried, picked = p["ids"], states, []
    for j in range(8):
        one = k1.run(ids, carried, p["temperature"], p["top_k"], p["top_p"], u[:, j:j + 1])
        picked.append(one.ids[:, 0])
        ids, carried = one.ids[:, 0], one.states
    assert np.array_equal(block.ids, np.stack(picked, axis=1))
    for a, b in zip(block.states, carried, strict=True):
        np.testing.assert_array_equal(a, b)


def test_k_step_graph_samples_what_the_host_samples_step_by_step(
        tiny: tuple[OnnxModel, DecodeGraph, DecodeGraph]) -> None:
    model, _, k8 = tiny
    rows = 1000
    p = check_rows(model.meta, rows, seed=5)
    states = primed_states(model, p["prime"])
    u = block_uniforms(p["keys"], np.zeros(rows, np.uint64), 8)
    block = k8.run(p["ids"], states, p["temperature"], p["top_k"], p["top_p"], u)
    want_ids, _, _ = host_decode(model, p["ids"], states, p, u)
    same = np.all(block.ids == want_ids, axis=1)
    assert np.all(same[p["temperature"] == 0])
    assert same.mean() >= 0.999


@pytest.mark.parametrize("steps", [1, 8])
def test_calls_without_details_run_a_reduced_graph_with_the_same_ids_and_states(
        tiny: tuple[OnnxModel, DecodeGraph, DecodeGraph], steps: int) -> None:
    """Rows that want no details run the graph without the details outputs and their nodes
    (onnxruntime runs every node whatever a call fetches): ids and states bit for bit."""
    model, k1, k8 = tiny
    graph = k1 if steps == 1 else k8
    assert graph.lean is not None
    rows = 700
    p = check_rows(model.meta, rows, seed=11)
    states = primed_states(model, p["prime"])
    u = block_uniforms(p["keys"], np.zeros(rows, np.uint64), steps)
    full = graph.run(p["ids"], states, p["temperature"], p["top_k"], p["top_p"], u,
                     details=True)
    lean = graph.run(p["ids"], states, p["temperature"], p["top_k"], p["top_p"], u,
                     details=False)
    assert full.chosen_prob is not None
    assert lean.chosen_prob is None
    assert np.array_equal(full.ids, lean.ids)
    for a, b in zip(full.states, lean.states, strict=True):
        np.testing.assert_array_equal(a, b)
    assert {o.name for o in graph.lean.get_outputs()} == {
        graph.spec.ids_output, *(s.output for s in model.meta.onnx.states)}


def test_details_equal_the_engines(tiny: tuple[OnnxModel, DecodeGraph, DecodeGraph]) -> None:
    """chosen_prob and the top 5 at temperature 1, as app.engine._record_details computes."""
    model, k1, _ = tiny
    rows = 400
    p = check_rows(model.meta, rows, seed=6)
    states = primed_states(model, p["prime"])
    u = block_uniforms(p["keys"], np.zeros(rows, np.uint64), 1)
    out = k1.run(p["ids"], states, p["temperature"], p["top_k"], p["top_p"], u)
    assert out.chosen_prob is not None
    assert out.top_ids is not None
    assert out.top_probs is not None
    logits, _ = model.run_numpy(p["ids"][:, None], states)
    probs = softmax(logits[:, -1])  # (B, V)
    chosen = np.take_along_axis(probs, out.ids.astype(np.int64), axis=1)
    np.testing.assert_allclose(out.chosen_prob, chosen, rtol=0, atol=1e-6)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :5]
    assert np.mean(np.all(out.top_ids[:, 0] == top, axis=1)) >= 0.99  # float32 ties aside
    np.testing.assert_allclose(out.top_probs[:, 0], np.take_along_axis(probs, top, axis=1),
                               rtol=0, atol=1e-6)
    assert k1.run(p["ids"], states, p["temperature"], p["top_k"], p["top_p"], u,
                  details=False).top_ids is None


def test_decode_graph_refuses_a_changed_weight_file(tiny_models: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_models / "tiny", tmp_path / "tiny"))
    load_decode_graph(folder, 1, options=CPU)
    with (folder / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="has changed since the decode graph was built"):
        load_decode_graph(folder, 1, options=CPU)


def test_decode_graph_of_unknown_version_or_k_is_refused(tiny_models: Path,
                                                          tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_models / "tiny", tmp_path / "tiny"))
    with pytest.raises(ArtifactError, match="no decode graph with K=3"):
        load_decode_graph(folder, 3, options=CPU)
    raw = json.loads((folder / "model.json").read_text())
    raw["decode_graphs"][0]["version"] = 99
    (folder / "model.json").write_text(json.dumps(raw))
    assert load_model(folder, CPU).graph_file == "model.onnx"  # the rest still serves
    with pytest.raises(ArtifactError, match="decode graph version 99"):
        load_decode_graph(folder, 1, options=CPU)


@pytest.mark.slow  # the CLI in a subprocess
def test_cli_adds_decode_graphs_without_tensorflow(tiny_models: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_models / "tiny", tmp_path / "tiny"))
    for d in folder.glob("decode.*.onnx"):
        d.unlink()
    raw = json.loads((folder / "model.json").read_text())
    raw["decode_graphs"] = []
    (folder / "model.json").write_text(json.dumps(raw))
    code = ("import sys\nfrom training.__main__ import main\n"
            f"rc = main(['decode-graph', {str(folder)!r}, '--steps', '2', '--no-details'])\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
            "sys.exit(rc)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (spec,) = read_metadata(folder).decode_graphs
    assert (spec.file, spec.steps, spec.details) == ("decode.k2.onnx", 2, False)
    assert load_decode_graph(folder, 2, options=CPU).run(
        np.zeros(3, np.int32), [np.zeros((3, 48), np.float32)] * 4, np.ones(3, np.float32),
        np.zeros(3, np.int64), np.ones(3, np.float32), np.full((3, 2), 0.5)).ids.shape == (3, 2)


@pytest.mark.parametrize("name", ["shakespeare", "nietzsche"])
def test_bundled_models_carry_checked_decode_graphs(name: str) -> None:
    from training.decode_artifact import check_against_host

    folder = ROOT / "models" / name
    meta = read_metadata(folder)
    sources = {(d.source, d.steps) for d in meta.decode_graphs}
    assert sources == {("model.onnx", 1), ("model.onnx", 8), ("model.int8.onnx", 1),
                       ("model.int8.onnx", 8)}
    for variant in (None, "int8"):
        model = load_model(folder, CPU, variant=variant)
        graph = load_decode_graph(folder, 1, variant=variant, options=CPU)
        check = check_against_host(graph, model, 1, rows=256, seed=11)
        assert check["greedy_identical"] == check["greedy_rows"]


@pytest.mark.parametrize("rows", [1, 2, 300])
@pytest.mark.parametrize("steps", [1, 8])
def test_block_uniforms_are_the_hosts_draws_column_by_column(rows: int, steps: int) -> None:
    """The K-step block (one vectorised call, or Python ints for one row) holds the bits the
    host sampler draws one step at a time, counters near the top of uint64 included."""
    rng = np.random.default_rng(rows * 10 + steps)
    keys = rng_mod.row_keys(rng.integers(0, 2**62, rows))
    counters = rng.integers(0, 2**62, rows).astype(np.uint64)
    counters[0] = np.uint64(2**64 - 3)  # wraps within the block, as uint64 arithmetic does
    with np.errstate(over="ignore"):
        want = np.stack([rng_mod.uniforms(keys, counters + np.uint64(j))
                         for j in range(steps)], axis=1)
    got = block_uniforms(keys, counters, steps)
    assert got.dtype == np.float64
    assert np.array_equal(got, want)
