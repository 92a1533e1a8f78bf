"""Training and export: data alignment, learning, ONNX parity, resume checks, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.artifact import read_metadata
from app.runtime import RuntimeOptions, load_model
from app.vocab import Vocabulary
from tests.conftest import run_cli
from training import data
from training.model import ModelConfig, build_inference_model, build_training_model, copy_weights


def test_windows_align_inputs_with_next_character_targets() -> None:
    ids = np.arange(23, dtype=np.int32)
    win = data.windows(ids, seq_len=5)
    assert win.shape == (4, 6)
    x, y = win[:, :-1], win[:, 1:]
    assert np.array_equal(y, x + 1)  # target t is input t + 1
    # every character after the first is a target exactly once (up to the dropped tail)
    assert np.array_equal(np.sort(y.ravel()), np.arange(1, 21))


def test_split_keeps_the_last_fraction_for_validation() -> None:
    ids = np.arange(100, dtype=np.int32)
    train, val = data.split(ids, 0.1)
    assert np.array_equal(val, np.arange(90, 100))
    assert len(train) == 90


def test_tf_dataset_yields_shifted_pairs() -> None:
    win = data.windows(np.arange(41, dtype=np.int32), seq_len=10)
    batches = list(data.dataset(win, batch_size=3, shuffle=False, seed=0))
    x, y = (np.asarray(t) for t in batches[0])
    assert x.shape == (3, 10)
    assert np.array_equal(y, x + 1)


def test_tiny_model_loss_falls(small_corpus: Path) -> None:
    import keras

    keras.utils.set_random_seed(0)
    text = small_corpus.read_text()[:20_000]
    vocab = Vocabulary.from_text([text])
    win = data.windows(vocab.encode(text), 40)
    cfg = ModelConfig(vocab_size=len(vocab), units=32, embedding_dim=8, layers=1, dropout=0.0)
    model = build_training_model(cfg)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = win[:, :-1], win[:, 1:]
    before = float(model.evaluate(x, y, verbose=0))
    model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    after = float(model.evaluate(x, y, verbose=0))
    assert after < before - 0.5, (before, after)


@pytest.mark.parametrize(("cell", "layers"), [("lstm", 1), ("lstm", 2), ("gru", 1), ("gru", 2)])
def test_export_matches_keras(cell: str, layers: int, tmp_path: Path) -> None:
    """ONNX from tf2onnx equals the Keras twin, and one multi-step call equals carried steps."""
    from training.export import _convert
    from training.keras_step import keras_step_fn

    cfg = ModelConfig(vocab_size=29, cell=cell, layers=layers, units=24,  # type: ignore[arg-type]
                      embedding_dim=8)
    trained = build_training_model(cfg)
    twin = build_inference_model(cfg)
    copy_weights(trained, twin)
    _convert(twin, cfg, tmp_path / "model.onnx", opset=17)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = cfg.state_names()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 29, (3, 12)).astype(np.int32)
    states = [rng.standard_normal((3, 24)).astype(np.float32) for _ in names]
    out = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, {"ids": ids, **dict(zip(names, states, strict=True))}),
                   strict=True))
    k_logits, k_states = keras_step_fn(twin)(ids, states)
    assert np.abs(out["logits"] - k_logits).max() <= 1e-4
    for n, ks in zip(names, k_states, strict=True):
        assert np.abs(out[f"{n}_out"] - ks).max() <= 1e-4

    # step by step with carried state == one call over the whole sequence
    carried = states
    step_logits = []
    for t in range(ids.shape[1]):
        res = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {"ids": ids[:, t:t + 1],
                                       **dict(zip(names, carried, strict=True))}), strict=True))
        step_logits.append(res["logits"])
        carried = [res[f"{n}_out"] for n in names]
    np.testing.assert_allclose(np.concatenate(step_logits, axis=1), out["logits"], atol=1e-5)
    for n, c in zip(names, carried, strict=True):
        np.testing.assert_allclose(c, out[f"{n}_out"], atol=1e-5)


def test_cli_train_export_evaluate_sample(tiny_models: Path, small_corpus: Path) -> None:
    """The session fixture ran `train` and `export`; check the artifact and the other commands."""
    model_dir = tiny_models / "tiny"
    meta = read_metadata(model_dir)
    assert meta.parity["greedy_match"] is True
    assert float(meta.parity["max_abs_logits"]) <= 1e-4  # type: ignore[arg-type]
    assert meta.onnx.ids_input == "ids"
    assert [s.input for s in meta.onnx.states] == [
        "h0", "c0", "h1", "c1"]
    assert str(meta.training["command"]).startswith("python -m training train")
    assert meta.corpus.sha256
    assert meta.versions["tensorflow"]
    for extra in ("loss.png", "samples.md", "log.csv"):
        assert (model_dir / extra).is_file()
    assert meta.validation is not None

    res = run_cli("training", "evaluate", str(model_dir), str(small_corpus))
    assert res.returncode == 0, res.stderr
    printed = float(res.stdout.split(":")[1].split("nats")[0])
    assert printed == pytest.approx(meta.validation.loss_nats, abs=1e-4)

    res = run_cli("training", "sample", str(model_dir), "--seed-text", "ROMEO:", "-n", "30",
                  "-t", "0.5", "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert "--- temperature 0.5\nROMEO:" in res.stdout

    model = load_model(model_dir, RuntimeOptions(device="cpu"))
    assert model.vocab.chars == meta.vocab


def test_resume_refuses_a_corpus_with_another_vocabulary(tmp_path: Path, small_corpus: Path
                                                         ) -> None:
    run = tmp_path / "run"
    res = run_cli("training", "train", str(small_corpus), "-o", str(run), "--units", "8",
                  "--embedding-dim", "4", "--layers", "1", "--epochs", "1", "--seq-len", "20",
                  "--steps-per-epoch", "2", "--sample-length", "5", "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    other = tmp_path / "other.txt"
    other.write_text(small_corpus.read_text()[:5000] + "€")
    res = run_cli("training", "train", str(other), "-o", str(run), "--resume", "--epochs", "2",
                  "--quiet")
    assert res.returncode == 2
    assert "vocabulary differs" in res.stderr
    assert "'€'" in res.stderr

    res = run_cli("training", "train", str(small_corpus), "-o", str(run), "--resume",
                  "--epochs", "2", "--steps-per-epoch", "2", "--sample-length", "5", "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((run / "state.json").read_text())["epochs_done"] == 2


def test_training_uses_mirrored_strategy_over_two_logical_cpus(tmp_path: Path,
                                                                small_corpus: Path) -> None:
    res = run_cli("training", "train", str(small_corpus), "-o", str(tmp_path / "run"),
                  "--units", "8", "--embedding-dim", "4", "--layers", "1", "--epochs", "1",
                  "--seq-len", "20", "--batch-size", "16", "--steps-per-epoch", "3",
                  "--sample-length", "5", "--cpu-devices", "2", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training on 2 replica(s) with MirroredStrategy" in res.stdout
    assert (tmp_path / "run" / "best.weights.h5").is_file()


def test_help_explains_every_option() -> None:
    for cmd in ("train", "export", "evaluate", "sample"):
        res = run_cli("training", cmd, "--help")
        assert res.returncode == 0
        assert "show this help" in res.stdout


def test_bundled_shakespeare_meets_its_target_and_matches_evaluate(shakespeare_path: Path
                                                                    ) -> None:
    meta = read_metadata(Path("models/shakespeare"))
    assert meta.validation is not None
    assert meta.validation.loss_nats <= 1.60
    res = run_cli("training", "evaluate", "models/shakespeare", str(shakespeare_path))
    assert res.returncode == 0, res.stderr
    printed = float(res.stdout.split(":")[1].split("nats")[0])
    assert printed == pytest.approx(meta.validation.loss_nats, abs=1e-4)
    assert meta.onnx.file == "model.onnx"
    assert Path("models/shakespeare/model.onnx").stat().st_size < 15_000_000


def test_bundled_nietzsche_is_lowercased() -> None:
    meta = read_metadata(Path("models/nietzsche"))
    assert meta.lowercase is True
    assert not any(c.isupper() for c in meta.vocab)
