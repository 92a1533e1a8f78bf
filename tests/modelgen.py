"""Tiny model folders for tests, written with onnx.helper and numpy: no TensorFlow, no training.

`build_model` writes what `python -m training export` writes, minus what needs a trained model
(validation loss, Keras parity, samples): `model.json` (app.artifact.ModelMetadata) and a
`model.onnx` with the exporter's contract,

    ids (B, T) int32, h<i>/c<i> (B, U) float32 per layer
      -> logits (B, T, V) float32, h<i>_out/c<i>_out (B, U) float32

built as Embedding (Gather) -> N x fused ONNX LSTM -> MatMul + Add, with random weights from a
seeded numpy generator, plus decode graphs from training/decode_artifact.py (checked against
the host sampler there, as at export). The folder is published with app.artifact's renames, so
a running server that reloads models sees it whole.

The logits get a random per-character bias on top of the recurrent part, so sampled text is not
uniform noise (some characters are common, some rare); `logit_bias` adds to it per character,
for a test that wants a character to come up often or never.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app.artifact import (
    FORMAT_VERSION,
    ONNX_FILE,
    ModelMetadata,
    check_model_name,
    publish_folder,
    write_metadata,
)

OPSET = 17
IR_VERSION = 8  # what tf2onnx writes for opset 17 (training/gru_graph.py)

# Every character the unicode tests need the service to carry unchanged: ASCII letters and
# whitespace, CJK and Hangul, astral emoji with the pieces of a ZWJ family, a skin tone and a
# flag, combining marks, VS16, the three characters str.splitlines splits on beyond CR and LF,
# CR, TAB and C0 controls.
UNICODE_VOCAB: list[str] = sorted({
    *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", " ", "\n", *"中文日本語", *"한국어",
    "😀", "👍", "👨", "\u200d", "👩", "👧", "\U0001f3fd", "\U0001f1eb", "\U0001f1f7",
    "\u0301", "\u0308", "\u0323", "\ufe0f", "\u2028", "\u2029", "\u0085", "\r", "\t", "\x00",
    "\x1b", "\x07",
})


def build_model(models_dir: Path, name: str, vocab: list[str], units: int = 8, layers: int = 1,
                seed: int = 0, decode_steps: tuple[int, ...] = (1, 8), embedding_dim: int = 8,
                logit_bias: Mapping[str, float] | None = None, **meta_overrides: Any) -> Path:
    """Write models_dir/name (model.json, model.onnx, decode.k<K>.onnx per K in decode_steps)
    and return it. `vocab` is sorted as the trainer sorts it; `meta_overrides` replace
    top-level model.json fields (e.g. lowercase=True, normalization="NFC")."""
    check_model_name(name)
    chars = sorted(vocab)
    rng = np.random.default_rng(seed)
    weights = _weights(rng, len(chars), units, layers, embedding_dim)
    bias = weights["logits_bias"]
    for ch, b in (logit_bias or {}).items():
        bias[chars.index(ch)] += np.float32(b)
    models_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=models_dir))
    work.chmod(0o755)
    try:
        (work / ONNX_FILE).write_bytes(
            _graph(weights, len(chars), units, layers).SerializeToString())
        write_metadata(work, _metadata(name, chars, units, layers, embedding_dim, seed,
                                       sum(int(w.size) for w in weights.values()),
                                       meta_overrides))
        if decode_steps:
            from training.decode_artifact import add_decode_graphs

            add_decode_graphs(work, steps=decode_steps)
        target = models_dir / name
        publish_folder(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return target


def _weights(rng: np.random.Generator, vocab: int, units: int, layers: int,
             embedding_dim: int) -> dict[str, npt.NDArray[np.float32]]:
    """Scaled so the gates neither saturate nor vanish: the state, and so the next character's
    distribution, depends on the characters fed."""
    def normal(shape: tuple[int, ...], scale: float) -> npt.NDArray[np.float32]:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w: dict[str, npt.NDArray[np.float32]] = {"embedding": normal((vocab, embedding_dim), 1.0)}
    size_in = embedding_dim
    for i in range(layers):
        w[f"lstm{i}_W"] = normal((1, 4 * units, size_in), 1.0 / np.sqrt(size_in))  # gates i,o,f,c
        w[f"lstm{i}_R"] = normal((1, 4 * units, units), 1.0 / np.sqrt(units))
        w[f"lstm{i}_B"] = np.zeros((1, 8 * units), np.float32)  # [Wb, Rb]
        size_in = units
    w["logits_kernel"] = normal((units, vocab), 3.0 / np.sqrt(units))  # (U, V)
    w["logits_bias"] = normal((vocab,), 1.0)  # (V,): some characters common, some rare
    return w


def _graph(w: dict[str, npt.NDArray[np.float32]], vocab: int, units: int, layers: int) -> Any:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(a, n) for n, a in w.items()]
    inits += [numpy_helper.from_array(np.array([0], np.int64), "axis0"),
              numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [
        helper.make_node("Transpose", ["ids"], ["ids_tb"], perm=[1, 0]),  # (T, B)
        helper.make_node("Gather", ["embedding", "ids_tb"], ["x0"]),  # (T, B, E)
    ]
    state_names: list[str] = []
    x = "x0"
    for i in range(layers):
        nodes += [
            helper.make_node("Unsqueeze", [f"h{i}", "axis0"], [f"h{i}_1bu"]),  # (1, B, U)
            helper.make_node("Unsqueeze", [f"c{i}", "axis0"], [f"c{i}_1bu"]),
            helper.make_node("LSTM", [x, f"lstm{i}_W", f"lstm{i}_R", f"lstm{i}_B", "",
                                      f"h{i}_1bu", f"c{i}_1bu"],
                             [f"lstm{i}_y", f"lstm{i}_yh", f"lstm{i}_yc"], hidden_size=units,
                             name=f"rnn_{i}"),  # Y (T, 1, B, U)
            helper.make_node("Squeeze", [f"lstm{i}_y", "axis1"], [f"x{i + 1}"]),  # (T, B, U)
            helper.make_node("Squeeze", [f"lstm{i}_yh", "axis0"], [f"h{i}_out"]),  # (B, U)
            helper.make_node("Squeeze", [f"lstm{i}_yc", "axis0"], [f"c{i}_out"]),
        ]
        state_names += [f"h{i}", f"c{i}"]
        x = f"x{i + 1}"
    nodes += [
        helper.make_node("Transpose", [x], ["y_btu"], perm=[1, 0, 2]),  # (B, T, U)
        helper.make_node("MatMul", ["y_btu", "logits_kernel"], ["logits_nobias"]),
        helper.make_node("Add", ["logits_nobias", "logits_bias"], ["logits"]),  # (B, T, V)
    ]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", "time"])] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", units])
        for n in state_names]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch", "time", vocab])] + [
        helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, ["batch", units])
        for n in state_names]
    graph = helper.make_graph(nodes, "char_rnn_step", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="charlstm.tests.modelgen")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _metadata(name: str, chars: list[str], units: int, layers: int, embedding_dim: int,
              seed: int, parameters: int, overrides: dict[str, Any]) -> ModelMetadata:
    import onnx

    states = [{"input": f"{k}{i}", "output": f"{k}{i}_out", "size": units}
              for i in range(layers) for k in ("h", "c")]
    fields: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "name": name, "vocab": chars, "lowercase": False,
        "architecture": {"cell": "lstm", "layers": layers, "units": units,
                         "embedding_dim": embedding_dim, "dropout": 0.0,
                         "parameters": parameters},
        "onnx": {"file": ONNX_FILE, "opset": OPSET, "ids_input": "ids",
                 "logits_output": "logits", "states": states},
        # Not trained on any text: an empty corpus, named as such.
        "corpus": {"name": "synthetic", "files": [], "sha256": hashlib.sha256(b"").hexdigest(),
                   "characters": 0},
        "training": {"command": "tests/modelgen.py build_model (random weights, untrained)",
                     "seed": seed},
        "versions": {"onnx": onnx.__version__, "numpy": np.__version__},
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return ModelMetadata.model_validate({**fields, **overrides})
