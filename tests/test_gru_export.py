"""GRU models export with the fused ONNX GRU op (training/gru_graph.py), equal to Keras."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from app.artifact import read_metadata
from tests.conftest import run_cli
from training.model import ModelConfig, build_inference_model

pytestmark = pytest.mark.slow  # TensorFlow


def op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_gru_graph_equals_keras_with_random_weights_and_biases(tmp_path: Path) -> None:
    """Keras initialises GRU biases to zero, which would hide a wrong bias layout: every
    weight, input and recurrent biases included, is random here."""
    import onnxruntime as ort

    from training.export import _convert
    from training.keras_step import keras_step_fn

    cfg = ModelConfig(vocab_size=31, cell="gru", layers=2, units=20, embedding_dim=6)
    twin = build_inference_model(cfg)
    rng = np.random.default_rng(7)
    for layer in twin.layers:
        if layer.weights:
            layer.set_weights([rng.standard_normal(w.shape).astype(np.float32) * 0.4
                               for w in layer.get_weights()])
    assert np.abs(twin.get_layer("rnn_0").get_weights()[2]).min() > 0  # biases really set
    _convert(twin, cfg, tmp_path / "model.onnx", opset=17)

    assert "GRU" in op_types(tmp_path / "model.onnx")
    assert "Loop" not in op_types(tmp_path / "model.onnx")
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = rng.integers(0, 31, (3, 9)).astype(np.int32)
    states = [rng.standard_normal((3, 20)).astype(np.float32) for _ in cfg.state_names()]
    logits, h0, h1 = sess.run(["logits", "h0_out", "h1_out"],
                              {"ids": ids, "h0": states[0], "h1": states[1]})
    k_logits, k_states = keras_step_fn(twin)(ids, states)
    assert np.abs(logits - k_logits).max() <= 1e-4
    assert np.abs(h0 - k_states[0]).max() <= 1e-4
    assert np.abs(h1 - k_states[1]).max() <= 1e-4


def test_cli_exports_a_trained_gru_with_the_fused_op(tmp_path: Path, small_corpus: Path) -> None:
    run, models = tmp_path / "run", tmp_path / "models"
    res = run_cli("training", "train", str(small_corpus), "-o", str(run), "--cell", "gru",
                  "--units", "16", "--embedding-dim", "8", "--layers", "2", "--epochs", "1",
                  "--seq-len", "20", "--steps-per-epoch", "20", "--sample-length", "5",
                  "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("training", "export", str(run), "--name", "tinygru", "--models-dir",
                  str(models))
    assert res.returncode == 0, res.stderr[-3000:]

    ops = op_types(models / "tinygru" / "model.onnx")
    assert "GRU" in ops
    assert "Loop" not in ops
    meta = read_metadata(models / "tinygru")
    assert meta.architecture.cell == "gru"
    assert [s.input for s in meta.onnx.states] == ["h0", "h1"]
    assert meta.parity["greedy_match"] is True
    assert float(meta.parity["max_abs_logits"]) <= 1e-4  # type: ignore[arg-type]
    assert float(meta.parity["max_abs_state"]) <= 1e-4  # type: ignore[arg-type]
