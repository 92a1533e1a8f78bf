"""`export`: best checkpoint -> models/<name>/{model.onnx, model.json, decode.k*.onnx, loss.png,
samples.md}.

The export checks its own output before it is published: onnxruntime and Keras must agree on
logits and states (random ids and states) and on a 200-character greedy decode, and each decode
graph must sample what the host sampler samples (training/decode_artifact.py). The validation
loss is measured there too, the three ways of training/evaluate.py. The artifact is built in a
hidden temporary folder in the models folder and moved into place by renames only when every
check passes and model.json is complete (app.artifact.publish_folder), so a running service
that reloads models (app/reload.py) never sees a half-written folder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from app.artifact import (
    FORMAT_VERSION,
    ONNX_FILE,
    Architecture,
    CorpusInfo,
    ModelMetadata,
    OnnxSpec,
    StateSpec,
    check_model_name,
    publish_folder,
    write_metadata,
)
from app.runtime import OnnxModel, RuntimeOptions, load_model
from app.vocab import Vocabulary
from training import corpus as corpus_mod
from training import data
from training.decode_artifact import add_decode_graphs
from training.evaluate import measure_all, print_measures, validation_info
from training.generate import generate
from training.model import ModelConfig, build_inference_model, build_training_model, copy_weights
from training.train import CONFIG_FILE, LOG_FILE, PLOT_FILE, SAMPLE_TEMPERATURES, read_log

GREEDY_CHARS = 200
SAMPLE_CHARS = 400


class ExportError(ValueError):
    """An export whose checks failed; nothing was written to the models folder."""


def _tensorflow_on_cpu() -> Any:
    """Import TensorFlow with the GPU hidden: Keras emits cuDNN ops there that tf2onnx rejects."""
    if "tensorflow" not in sys.modules:
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    # RuntimeError: devices already initialised, and CUDA_VISIBLE_DEVICES covered it.
    with contextlib.suppress(RuntimeError):
        tf.config.set_visible_devices([], "GPU")
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ExportError("export needs the TensorFlow Keras backend (unset KERAS_BACKEND)")
    return tf


def _convert(twin: Any, cfg: ModelConfig, path: Path, opset: int) -> None:
    """LSTM through tf2onnx (one fused ONNX LSTM op per layer); GRU written directly with the
    fused ONNX GRU op, where tf2onnx would emit generic Loop ops (training/gru_graph.py)."""
    if cfg.cell == "gru":
        import onnx

        from training.gru_graph import build_gru_graph

        onnx.save(build_gru_graph(twin, cfg, opset), str(path))
        return
    tf = _tensorflow_on_cpu()
    import tf2onnx

    spec = [tf.TensorSpec([None, None], tf.int32, name="ids")] + [
        tf.TensorSpec([None, cfg.units], tf.float32, name=n) for n in cfg.state_names()
    ]

    @tf.function(input_signature=spec)  # type: ignore[untyped-decorator]
    def step(ids: Any, *states: Any) -> Any:
        return twin([ids, *states], training=False)

    tf2onnx.convert.from_function(step, input_signature=spec, opset=opset, output_path=str(path))


def _parity(twin: Any, model: OnnxModel, cfg: ModelConfig, vocab: Vocabulary, seed_text: str,
            tolerance: float) -> dict[str, object]:
    from training.keras_step import keras_step_fn

    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(4, 37)).astype(np.int32)
    states = [rng.standard_normal((4, cfg.units)).astype(np.float32) * 0.5
              for _ in cfg.state_names()]
    k_logits, k_states = keras_step_fn(twin)(ids, states)
    o_logits, o_states = model.run_numpy(ids, states)
    d_logits = float(np.abs(k_logits - o_logits).max())
    d_states = max(float(np.abs(a - b).max()) for a, b in zip(k_states, o_states, strict=True))
    if d_logits > tolerance or d_states > tolerance:
        raise ExportError(f"ONNX and Keras disagree: max |logits diff| {d_logits:.2e}, "
                          f"max |state diff| {d_states:.2e}, tolerance {tolerance:.0e}")
    n = len(cfg.state_names())
    greedy = [
        generate(fn, vocab, seed_text, [0.0], GREEDY_CHARS, n, cfg.units,
                 np.random.default_rng(0))[0]
        for fn in (keras_step_fn(twin), model.run_numpy)
    ]
    if greedy[0] != greedy[1]:
        at = next(i for i, (a, b) in enumerate(zip(*greedy, strict=True)) if a != b)
        raise ExportError(f"greedy decoding differs between Keras and ONNX at character {at}: "
                          f"{greedy[0][:at + 10]!r} vs {greedy[1][:at + 10]!r}")
    return {"max_abs_logits": d_logits, "max_abs_state": d_states, "tolerance": tolerance,
            "greedy_chars": GREEDY_CHARS, "greedy_match": True, "greedy_text": greedy[0]}


def _versions() -> dict[str, str]:
    import keras
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def _load_corpus(saved: dict[str, Any]) -> corpus_mod.Corpus:
    info = saved["corpus"]
    sources = corpus_mod.sources_for(info["name"], info["files"])
    corpus = corpus_mod.load(sources, lowercase=bool(saved["lowercase"]),
                             normalization=saved.get("normalization"))
    if corpus.sha256 != info["sha256"]:
        raise ExportError(f"corpus {sources} has sha256 {corpus.sha256[:16]}..., but the model was "
                          f"trained on {info['sha256'][:16]}...")
    return corpus


def export(run_dir: Path, name: str, models_dir: Path, checkpoint: str = "best.weights.h5",
           opset: int = 17, tolerance: float = 1e-4) -> Path:
    check_model_name(name)
    _tensorflow_on_cpu()
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise ExportError(f"{run_dir}: not a training run (no {CONFIG_FILE})")
    saved: dict[str, Any] = json.loads(cfg_path.read_text())
    cfg = ModelConfig(**saved["model"])
    vocab = Vocabulary(saved["vocab"])
    weights = run_dir / checkpoint
    if not weights.is_file():
        raise ExportError(f"{weights}: missing; train first (or pass --checkpoint)")

    trained = build_training_model(cfg)
    trained.load_weights(str(weights))
    twin = build_inference_model(cfg)
    copy_weights(trained, twin)

    corpus = _load_corpus(saved)
    _, val_ids = data.split(vocab.encode(corpus.text), float(saved["val_fraction"]))
    models_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=models_dir))
    work.chmod(0o755)  # mkdtemp makes it 0700; the service often runs as another user
    try:
        _convert(twin, cfg, work / ONNX_FILE, opset)
        meta = ModelMetadata(
            format_version=FORMAT_VERSION,
            name=name,
            vocab=vocab.chars,
            lowercase=bool(saved["lowercase"]),
            normalization=saved.get("normalization"),
            architecture=Architecture(
                cell=cfg.cell, layers=cfg.layers, units=cfg.units,
                embedding_dim=cfg.embedding_dim, dropout=cfg.dropout,
                parameters=int(trained.count_params()),
            ),
            onnx=OnnxSpec(file=ONNX_FILE, opset=opset, ids_input="ids", logits_output="logits",
                          states=[StateSpec(input=n, output=f"{n}_out", size=cfg.units)
                                  for n in cfg.state_names()]),
            corpus=CorpusInfo(name=saved["corpus"]["name"],
                              files=list(saved["corpus"]["files"]),
                              sha256=saved["corpus"]["sha256"],
                              characters=int(saved["corpus"]["characters"])),
            training={k: saved[k] for k in ("command", "seq_len", "batch_size", "learning_rate",
                                            "seed", "val_fraction", "backend", "speed")
                      if k in saved},
            versions=_versions(),
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        write_metadata(work, meta)
        model = load_model(work, RuntimeOptions(device="cpu", intra_op_threads=0))
        seed_text = vocab.decode(val_ids[:60])
        parity = _parity(twin, model, cfg, vocab, seed_text, tolerance)
        # The three measures of training/evaluate.py, recorded before the folder is published.
        fraction = float(saved["val_fraction"])
        measures = measure_all(model.run_numpy, model.state_sizes, val_ids,
                               int(saved["seq_len"]))
        meta = meta.model_copy(update={
            "parity": parity,
            "validation": validation_info(measures, fraction),
            "training": {**meta.training, **_training_summary(run_dir)},
        })
        write_metadata(work, meta)
        decode_graphs = add_decode_graphs(work)
        _write_samples(work, name, model, seed_text)
        for extra in (PLOT_FILE, LOG_FILE):
            if (run_dir / extra).is_file():
                shutil.copy2(run_dir / extra, work / extra)
        # Everything, the three validation measures included, is in place before the folder
        # is published: a running service loads it once, whole.
        target = models_dir / name
        publish_folder(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work)
    print(f"parity: max |logits diff| {parity['max_abs_logits']:.2e}, max |state diff| "
          f"{parity['max_abs_state']:.2e}, greedy {GREEDY_CHARS} chars identical")
    print_measures(name, measures, fraction)  # model.name is the temporary folder's
    print("decode graphs: " + ", ".join(f"{d.file} (K={d.steps})" for d in decode_graphs))
    return target


def _training_summary(run_dir: Path) -> dict[str, object]:
    rows = read_log(run_dir / LOG_FILE)
    if not rows:
        return {}
    best = min(rows, key=lambda r: float(r["val_loss"]))
    return {"epochs": len(rows), "best_epoch": int(best["epoch"]) + 1,
            "best_val_loss_keras": round(float(best["val_loss"]), 4)}


def _write_samples(folder: Path, name: str, model: OnnxModel, seed_text: str) -> None:
    texts = generate(model.run_numpy, model.vocab, seed_text, SAMPLE_TEMPERATURES, SAMPLE_CHARS,
                     len(model.state_in), model.state_sizes[0], np.random.default_rng(42))
    parts = [f"# Samples from `{name}`\n\nSeed (first 60 characters of the validation "
             f"text), then {SAMPLE_CHARS} sampled characters, numpy seed 42.\n"]
    for t, text in zip(SAMPLE_TEMPERATURES, texts, strict=True):
        parts.append(f"## temperature {t}\n\n```text\n{seed_text}{text}\n```\n")
    (folder / "samples.md").write_text("\n".join(parts), encoding="utf-8")
