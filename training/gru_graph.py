"""Keras GRU twin -> ONNX graph whose recurrent layers are the fused ONNX `GRU` op.

tf2onnx turns a Keras 3 GRU (reset_after=True) into two generic `Loop` ops, which onnxruntime
runs node by node per character. ONNX `GRU` with linear_before_reset=1 is the same cell, so the
graph is written here from the Keras weights instead, with the artifact's input and output names
(the same contract as the tf2onnx LSTM graph):

    ids (B, T) int32, h<i> (B, U)  ->  logits (B, T, V), h<i>_out (B, U)

Keras GRU (reset_after=True), per time step, with kernel W (in, 3U), recurrent kernel R (U, 3U),
bias (2, 3U) = [input bias b, recurrent bias rb], gates in the order z, r, h:

    z  = sigmoid(x W_z + b_z + h R_z + rb_z)
    r  = sigmoid(x W_r + b_r + h R_r + rb_r)
    hh = tanh(x W_h + b_h + r * (h R_h + rb_h))
    h' = z * h + (1 - z) * hh

ONNX GRU with linear_before_reset=1 computes exactly this with W = kernel^T, R = recurrent^T
(both gate order z, r, h) and B = [Wb, Rb] = [b, rb]; export's parity check confirms it against
Keras on every model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from training.model import ModelConfig

IR_VERSION = 8  # what tf2onnx writes for opset 17; onnxruntime 1.20+ reads it


def _gru_weights(layer: Any, units: int) -> tuple[npt.NDArray[np.float32], ...]:
    """Keras GRU weights -> ONNX W (1, 3U, in), R (1, 3U, U), B (1, 6U)."""
    kernel, recurrent, bias = (np.asarray(w, np.float32) for w in layer.get_weights())
    if bias.shape != (2, 3 * units):
        raise ValueError(f"layer {layer.name}: expected a reset_after GRU bias of shape "
                         f"(2, {3 * units}), got {bias.shape}")
    w = kernel.T[None]  # (1, 3U, in), gates z, r, h as in Keras
    r = recurrent.T[None]  # (1, 3U, U)
    b = bias.reshape(1, 6 * units)  # [Wb (input bias), Rb (recurrent bias)]
    return w, r, b


def build_gru_graph(twin: Any, cfg: ModelConfig, opset: int) -> Any:
    """The inference twin of a GRU model as an onnx.ModelProto (not yet checked: export's
    parity check compares it with Keras before anything is published)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if cfg.cell != "gru":
        raise ValueError(f"build_gru_graph needs a GRU model, got cell {cfg.cell!r}")
    if opset < 14:
        raise ValueError(f"the fused GRU graph needs opset >= 14, got {opset}")
    layers = {layer.name: layer for layer in twin.layers}
    inits = [numpy_helper.from_array(np.asarray(layers["embedding"].get_weights()[0],
                                                np.float32), "embedding")]  # (V, E)
    dense_w, dense_b = (np.asarray(w, np.float32) for w in layers["logits"].get_weights())
    inits += [numpy_helper.from_array(dense_w, "logits_kernel"),  # (U, V)
              numpy_helper.from_array(dense_b, "logits_bias"),  # (V,)
              numpy_helper.from_array(np.array([0], np.int64), "axis0"),
              numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [
        helper.make_node("Transpose", ["ids"], ["ids_tb"], perm=[1, 0]),  # (T, B)
        helper.make_node("Gather", ["embedding", "ids_tb"], ["x0"]),  # (T, B, E)
    ]
    x = "x0"
    for i in range(cfg.layers):
        w, r, b = _gru_weights(layers[f"rnn_{i}"], cfg.units)
        inits += [numpy_helper.from_array(w, f"gru{i}_W"), numpy_helper.from_array(r, f"gru{i}_R"),
                  numpy_helper.from_array(b, f"gru{i}_B")]
        nodes += [
            helper.make_node("Unsqueeze", [f"h{i}", "axis0"], [f"h{i}_1bu"]),  # (1, B, U)
            helper.make_node("GRU", [x, f"gru{i}_W", f"gru{i}_R", f"gru{i}_B", "", f"h{i}_1bu"],
                             [f"gru{i}_y", f"gru{i}_yh"], hidden_size=cfg.units,
                             linear_before_reset=1, name=f"rnn_{i}"),  # Y (T, 1, B, U)
            helper.make_node("Squeeze", [f"gru{i}_y", "axis1"], [f"x{i + 1}"]),  # (T, B, U)
            helper.make_node("Squeeze", [f"gru{i}_yh", "axis0"], [f"h{i}_out"]),  # (B, U)
        ]
        x = f"x{i + 1}"
    nodes += [
        helper.make_node("Transpose", [x], ["y_btu"], perm=[1, 0, 2]),  # (B, T, U)
        helper.make_node("MatMul", ["y_btu", "logits_kernel"], ["logits_nobias"]),
        helper.make_node("Add", ["logits_nobias", "logits_bias"], ["logits"]),  # (B, T, V)
    ]
    state_names = cfg.state_names()
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", "time"])] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", cfg.units])
        for n in state_names]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch", "time", cfg.vocab_size])] + [
        helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, ["batch", cfg.units])
        for n in state_names]
    graph = helper.make_graph(nodes, "char_rnn_step", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="charlstm.training.gru_graph")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model
