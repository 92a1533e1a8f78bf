"""`quantize`: models/<name>/model.onnx -> model.int8.onnx, listed in model.json if it scores.

onnxruntime's dynamic quantization stores the weights as int8 and quantizes activations on the
fly (LSTM layers become DynamicQuantizeLSTM, the output layer an integer MatMul): a CPU variant,
with the same inputs and outputs as model.onnx. It is scored with training/evaluate.py's
`cross_entropy` next to the fp32 graph on the same windows in the same run, and refused (nothing
written) when it loses more than `max_increase` nats/char. No TensorFlow here.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from app.artifact import GraphVariant, VariantCheck, read_metadata, write_metadata
from app.runtime import RuntimeOptions, batch_invariant, load_model, open_step_graph
from training.evaluate import (
    cross_entropy,
    load_text,
    model_train_window,
    model_val_fraction,
    validation_ids,
)

INT8 = "int8"
METHOD = "onnxruntime.quantization.quantize_dynamic(weight_type=QInt8, per_channel=False)"
MAX_INCREASE_NATS = 0.01


class QuantizeError(ValueError):
    """A variant that failed its loss check; nothing was written to the model folder."""


def variant_file(name: str) -> str:
    return f"model.{name}.onnx"


def quantize_int8(model_dir: Path, texts: list[Path], val_fraction: float | None = None,
                  window: int | None = None,
                  max_increase: float = MAX_INCREASE_NATS) -> GraphVariant:
    """Write model.int8.onnx and list it in model.json, or raise QuantizeError. By default it is
    scored on the model's own validation split and window (model.json), like `evaluate`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    meta = read_metadata(model_dir)
    options = RuntimeOptions(device="cpu", intra_op_threads=0)
    fp32 = load_model(model_dir, options)
    file = variant_file(INT8)
    partial = model_dir / f".{file}.partial"
    try:
        quantize_dynamic(model_dir / meta.onnx.file, partial, weight_type=QuantType.QInt8)
        int8 = open_step_graph(model_dir, meta, partial.name, options)
        fraction = model_val_fraction(meta) if val_fraction is None else val_fraction
        ids = validation_ids(fp32, load_text(meta, texts), fraction)
        win = window or model_train_window(meta)
        reference = cross_entropy(fp32, ids, win)
        score = cross_entropy(int8, ids, win)
        print(f"{meta.name}: fp32 {reference.loss_nats:.4f}, int8 {score.loss_nats:.4f} "
              f"nats/char over {score.characters:,} characters (windows of {win})")
        if score.loss_nats > reference.loss_nats + max_increase:
            raise QuantizeError(
                f"{model_dir}: int8 loses {score.loss_nats - reference.loss_nats:.4f} nats/char "
                f"({score.loss_nats:.4f} vs fp32 {reference.loss_nats:.4f}), more than the "
                f"{max_increase} allowed; not written")
        invariant = batch_invariant(int8)
        if not invariant:
            print(f"{meta.name}: the int8 graph's output for a row depends on the other rows in "
                  "its batch (dynamic activation quantization), so `CHARLSTM_VARIANT=auto` "
                  "serves model.onnx; CHARLSTM_VARIANT=int8 serves this variant, and seeded "
                  "generations then vary with load")
        variant = GraphVariant(
            name=INT8, file=file, method=METHOD,
            validation=VariantCheck(loss_nats=round(score.loss_nats, 5),
                                    reference_loss_nats=round(reference.loss_nats, 5),
                                    max_increase_nats=max_increase,
                                    characters=score.characters, window=win),
            batch_invariant=invariant)
        partial.replace(model_dir / file)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    # A decode graph built from an older model.int8.onnx reads weights that are gone.
    stale = [d for d in meta.decode_graphs if d.source == file]
    for d in stale:
        print(f"dropping decode graph {d.file} (built from the previous {file}); rebuild it with "
              "`python -m training decode-graph`")
        with contextlib.suppress(FileNotFoundError):
            (model_dir / d.file).unlink()
    write_metadata(model_dir, meta.model_copy(update={
        "variants": [*(v for v in meta.variants if v.name != INT8), variant],
        "decode_graphs": [d for d in meta.decode_graphs if d not in stale],
    }))
    return variant
