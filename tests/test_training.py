"""Training and export: data alignment, learning, ONNX parity, resume checks, the CLI."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.artifact import read_metadata
from app.runtime import RuntimeOptions, load_model
from app.vocab import Vocabulary
from tests.conftest import ROOT, run_cli
from training import data
from training.evaluate import carried_loss, window_loss
from training.generate import States
from training.model import ModelConfig, build_inference_model, build_training_model, copy_weights

pytestmark = pytest.mark.slow  # TensorFlow: trains and exports with the CLI

TINY = ["--units", "8", "--embedding-dim", "4", "--layers", "1", "--seq-len", "20",
        "--sample-length", "5"]
JAX_INSTALLED = importlib.util.find_spec("jax") is not None


def printed_measures(stdout: str) -> dict[str, float]:
    """`training evaluate`'s figures, nats/char by measure, from its printed table."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) > 2 and parts[2] == "nats/char":
            out[parts[0]] = float(parts[1])
    return out


def log_epochs(run: Path) -> list[int]:
    with (run / "log.csv").open() as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


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


def test_stream_windows_continue_each_stream_from_one_batch_to_the_next() -> None:
    ids = np.arange(1000, dtype=np.int32)
    streams, seq_len = 4, 10
    win = data.stream_windows(ids, seq_len, streams)
    per_stream = (len(ids) - 1) // streams  # 249: 24 windows of 10 each
    assert win.shape == (24 * streams, seq_len + 1)
    batches = win.reshape(24, streams, seq_len + 1)  # (batch i, stream j, T + 1)
    x, y = batches[..., :-1], batches[..., 1:]
    assert np.array_equal(y, x + 1)
    # window i+1 of stream j starts where window i of stream j ended
    assert np.array_equal(x[1:, :, 0], y[:-1, :, -1])
    # stream j reads contiguous text from offset j * per_stream
    assert np.array_equal(x[0, :, 0], np.arange(streams) * per_stream)
    for j in range(streams):
        read = np.concatenate([x[:, j].ravel(), y[-1:, j, -1]])
        assert np.array_equal(read, np.arange(j * per_stream, j * per_stream + 241))
    # every target at most once
    assert len(np.unique(y)) == y.size


def test_stream_dataset_keeps_stream_j_in_row_j_of_every_batch() -> None:
    win = data.stream_windows(np.arange(500, dtype=np.int32), seq_len=8, streams=3)
    batches = [np.asarray(x) for x, _ in data.dataset(win, 3, shuffle=False, seed=0)]
    assert all(b.shape == (3, 8) for b in batches)
    for prev, nxt in itertools.pairwise(batches):
        assert np.array_equal(nxt[:, 0], prev[:, -1] + 1)


def test_stateful_model_carries_state_across_batches_and_resets_each_epoch() -> None:
    import keras

    from training.model import stateful_layers
    from training.train import reset_states_each_epoch

    keras.utils.set_random_seed(0)
    cfg = ModelConfig(vocab_size=20, units=6, embedding_dim=4, layers=1, dropout=0.0)
    model = build_training_model(cfg, stateful_batch=4)
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    (rnn,) = stateful_layers(model)
    win = data.stream_windows(np.arange(200, dtype=np.int32) % 20, seq_len=10, streams=4)
    seen: list[tuple[str, int, np.ndarray]] = []

    class Record(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            seen.append(("begin", batch, np.array(rnn.states[0].numpy())))

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            seen.append(("end", batch, np.array(rnn.states[0].numpy())))

    model.fit(win[:, :-1], win[:, 1:], batch_size=4, shuffle=False, epochs=2, verbose=0,
              callbacks=[reset_states_each_epoch(), Record()])
    begins = [(b, h) for kind, b, h in seen if kind == "begin"]
    ends = [(b, h) for kind, b, h in seen if kind == "end"]
    assert len(begins) == 2 * len(win) // 4
    for (b, h_begin), (_, h_prev_end) in zip(begins[1:], ends, strict=False):
        if b == 0:  # a new epoch: reset, although the last batch left a state
            assert not h_begin.any()
            assert h_prev_end.any()
        else:  # carried: the state the previous batch ended in, row by row
            assert h_begin.any()
            np.testing.assert_array_equal(h_begin, h_prev_end)


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


def _ort_step(session: Any, names: list[str]) -> Any:
    outputs = [o.name for o in session.get_outputs()]

    def step(ids: np.ndarray, states: States) -> tuple[np.ndarray, States]:
        out = dict(zip(outputs, session.run(None, {"ids": ids,
                                                   **dict(zip(names, states, strict=True))}),
                       strict=True))
        return out["logits"], [out[f"{n}_out"] for n in names]

    return step


def test_carried_state_loss_equals_a_char_by_char_onnxruntime_pass(tmp_path: Path) -> None:
    import onnxruntime as ort

    from training.export import _convert

    cfg = ModelConfig(vocab_size=11, layers=2, units=12, embedding_dim=6)
    twin = build_inference_model(cfg)
    # Larger than the initial weights, so that the state makes a difference worth testing.
    twin.set_weights([w * 4 for w in twin.get_weights()])
    _convert(twin, cfg, tmp_path / "model.onnx", opset=17)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    names = cfg.state_names()
    step = _ort_step(session, names)
    ids = np.random.default_rng(3).integers(0, 11, 300).astype(np.int32)

    # Independently: one character per call, the state carried, -log p summed.
    states = [np.zeros((1, cfg.units), np.float32) for _ in names]
    total = 0.0
    for t in range(len(ids) - 1):
        logits, states = step(ids[None, t : t + 1], states)
        z = logits[0, 0].astype(np.float64)
        total -= z[ids[t + 1]] - z.max() - math.log(np.exp(z - z.max()).sum())
    expected = total / (len(ids) - 1)

    sizes = [cfg.units] * len(names)
    score = carried_loss(step, sizes, ids, chunk=37)  # chunks that do not divide the text
    assert score.characters == len(ids) - 1
    assert score.loss_nats == pytest.approx(expected, rel=1e-5)
    # ... and it is not what resetting the state at each chunk would give
    assert abs(window_loss(step, sizes, ids, 37).loss_nats - expected) > 1e-4


# One xdist worker trains the session's model for both of its users (`make test`: --dist loadgroup).
@pytest.mark.xdist_group("trained_tiny")
def test_cli_train_export_evaluate_sample(trained_tiny: Path, small_corpus: Path) -> None:
    """The session fixture ran `train` and `export`; check the artifact and the other commands."""
    model_dir = trained_tiny / "tiny"
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
    measures = meta.validation.measures
    assert list(measures) == ["training_windows", "windows_256", "carried_state"]
    assert measures["training_windows"].loss_nats == meta.validation.loss_nats
    assert measures["training_windows"].window == meta.training["seq_len"] == 50
    assert measures["windows_256"].window == 256
    assert measures["carried_state"].window == measures["carried_state"].characters

    res = run_cli("training", "evaluate", str(model_dir), str(small_corpus))
    assert res.returncode == 0, res.stderr
    printed = printed_measures(res.stdout)
    assert printed == pytest.approx({k: m.loss_nats for k, m in measures.items()}, abs=1e-4)

    res = run_cli("training", "sample", str(model_dir), "--seed-text", "ROMEO:", "-n", "30",
                  "-t", "0.5", "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert "--- temperature 0.5\nROMEO:" in res.stdout

    model = load_model(model_dir, RuntimeOptions(device="cpu"))
    assert model.vocab.chars == meta.vocab


def test_evaluate_update_rewrites_model_json_with_the_three_measures(
        tiny_models: Path, small_corpus: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    shutil.copytree(tiny_models / "tiny", model_dir)
    raw = json.loads((model_dir / "model.json").read_text())
    raw["validation"].pop("measures")  # as written before there were three
    (model_dir / "model.json").write_text(json.dumps(raw))
    old = read_metadata(model_dir)  # an older model.json still loads
    assert old.validation is not None
    assert old.validation.measures == {}

    res = run_cli("training", "evaluate", str(model_dir), str(small_corpus), "--update")
    assert res.returncode == 0, res.stderr
    meta = read_metadata(model_dir)
    assert meta.validation is not None
    assert meta.validation.loss_nats == old.validation.loss_nats  # kept for continuity
    got = {k: m.loss_nats for k, m in meta.validation.measures.items()}
    assert got == pytest.approx(printed_measures(res.stdout), abs=1e-4)
    assert set(got) == {"training_windows", "windows_256", "carried_state"}
    assert meta.parity == old.parity
    assert meta.training == old.training
    assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".")]  # no temp left

    other = tmp_path / "other.txt"
    other.write_text(small_corpus.read_text()[:-1])
    before = (model_dir / "model.json").read_bytes()
    res = run_cli("training", "evaluate", str(model_dir), str(other), "--update")
    assert res.returncode == 2
    assert "refusing to update" in res.stderr
    assert (model_dir / "model.json").read_bytes() == before


def test_export_refuses_to_replace_a_model_folder_without_force(tiny_models: Path,
                                                                tmp_path: Path) -> None:
    before = (tiny_models / "tiny" / "model.json").read_bytes()
    res = run_cli("training", "export", str(tmp_path), "--name", "tiny", "--models-dir",
                  str(tiny_models))
    assert res.returncode == 2
    assert "already exists: pass --force" in res.stderr
    assert (tiny_models / "tiny" / "model.json").read_bytes() == before


def test_resume_refuses_a_corpus_with_another_vocabulary(tmp_path: Path, small_corpus: Path
                                                         ) -> None:
    run = tmp_path / "run"
    res = run_cli("training", "train", str(small_corpus), "-o", str(run), *TINY, "--epochs", "1",
                  "--steps-per-epoch", "2", "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    other = tmp_path / "other.txt"
    other.write_text(small_corpus.read_text()[:5000] + "€")
    # Refused before TensorFlow is imported: the answer comes in a second, not after its start-up.
    res = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom training.__main__ import main\n"
         "code = main(sys.argv[1:])\nassert 'tensorflow' not in sys.modules, 'imported'\n"
         "sys.exit(code)", "train", str(other), "-o", str(run), "--resume", "--epochs", "2",
         "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
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


def test_help_explains_every_option_without_none_defaults() -> None:
    for cmd in ("train", "export", "evaluate", "sample", "quantize", "decode-graph"):
        res = run_cli("training", cmd, "--help")
        assert res.returncode == 0
        assert "show this help" in res.stdout
        assert "(default: None)" not in res.stdout
        assert "(default: False)" not in res.stdout
    res = run_cli("training", "train", "--help")
    assert "(default: 100)" in res.stdout  # real defaults are still shown


# --- a run as a new user sees it: output to a file, an old run folder, CPU only ---------

@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path
              ) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`train --force` into a folder holding an older run, output captured (not a terminal),
    $KERAS_BACKEND naming another backend than --backend."""
    run = tmp_path_factory.mktemp("plain") / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "log.csv").write_text("epoch,loss,val_loss\n0,9.0,0.5\n")
    res = run_cli("training", "train", str(small_corpus), "-o", str(run), *TINY, "--epochs", "2",
                  "--steps-per-epoch", "3", "--force", "--backend", "tensorflow",
                  env={"KERAS_BACKEND": "jax"})
    assert res.returncode == 0, res.stderr[-3000:]
    return run, res


def test_redirected_output_has_no_control_codes_and_a_line_per_epoch(
        plain_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    _, res = plain_run
    for code in ("\x1b[", "\x08", "\r"):
        assert code not in res.stdout
    epoch_lines = [line for line in res.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == ["epoch 1/2", "epoch 2/2"]
    assert all(re.search(r", [\d,]+ chars/s, \d+ s$", line) for line in epoch_lines)
    assert re.search(r"^throughput: [\d,]+ target characters per second", res.stdout, re.M)


def test_log_csv_counts_epochs_from_one_like_the_console(
        plain_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run, _ = plain_run
    assert log_epochs(run) == [1, 2]  # the stale row of the older run is gone (--force)


def test_run_ends_by_naming_the_best_epoch_and_its_loss(
        plain_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run, res = plain_run
    with (run / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    best = min(rows, key=lambda r: float(r["val_loss"]))
    loss = float(best["val_loss"])
    assert (f"best: epoch {best['epoch']}, validation loss {loss:.4f} nats/char "
            f"({loss / math.log(2):.4f} bits/char), weights {run / 'best.weights.h5'}"
            ) in res.stdout


def test_backend_flag_reaches_keras_over_the_environment(
        plain_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run, res = plain_run
    assert json.loads((run / "config.json").read_text())["backend"] == "tensorflow"
    assert "Keras backend tensorflow" in res.stdout


def test_cpu_only_run_prints_no_cuda_error_or_keras_shuffle_warning(
        plain_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    _, res = plain_run
    assert "cuInit" not in res.stderr
    assert "shuffle" not in res.stderr


def test_training_refuses_a_run_folder_that_holds_a_run(
        plain_run: tuple[Path, subprocess.CompletedProcess[str]], small_corpus: Path) -> None:
    run, _ = plain_run
    before = (run / "log.csv").read_bytes()
    res = run_cli("training", "train", str(small_corpus), "-o", str(run), "--epochs", "1")
    assert res.returncode == 2
    assert "already holds a training run" in res.stderr
    assert "--resume" in res.stderr
    assert "--force" in res.stderr
    assert (run / "log.csv").read_bytes() == before


def test_resume_renumbers_a_log_counted_from_zero(
        plain_run: tuple[Path, subprocess.CompletedProcess[str]], small_corpus: Path,
        tmp_path: Path) -> None:
    from training.train import read_log

    run = tmp_path / "run"
    shutil.copytree(plain_run[0], run)
    with (run / "log.csv").open() as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames or []), list(reader)
    with (run / "log.csv").open("w", newline="") as f:  # as written before counting from 1
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({**r, "epoch": str(int(r["epoch"]) - 1)} for r in rows)
    assert [int(r["epoch"]) for r in read_log(run / "log.csv")] == [0, 1]

    res = run_cli("training", "train", str(small_corpus), "-o", str(run), "--resume",
                  "--epochs", "3", "--steps-per-epoch", "3", "--sample-length", "5", "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    assert log_epochs(run) == [1, 2, 3]
    assert [int(r["epoch"]) for r in read_log(run / "log.csv")] == [0, 1, 2]  # Keras's index


@pytest.mark.skipif(JAX_INSTALLED, reason="jax is installed here")
def test_missing_backend_is_named_with_how_to_install_it(tmp_path: Path,
                                                        small_corpus: Path) -> None:
    for args, env in ((["--backend", "jax"], {}), ([], {"KERAS_BACKEND": "jax"})):
        res = run_cli("training", "train", str(small_corpus), "-o", str(tmp_path / "run"),
                      *args, env=env)
        assert res.returncode == 2
        assert "the jax backend needs the jax package, which is not installed" in res.stderr
        assert "pip install" in res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not JAX_INSTALLED, reason="jax is not installed here")
def test_jax_backend_trains_and_records_it(tmp_path: Path, small_corpus: Path) -> None:
    run = tmp_path / "run"
    res = run_cli("training", "train", str(small_corpus), "-o", str(run), *TINY,
                  "--epochs", "1", "--steps-per-epoch", "2", "--backend", "jax", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "config.json").read_text())["backend"] == "jax"
    assert (run / "best.weights.h5").is_file()


def test_stateful_training_runs_end_to_end_with_stateless_weights_and_measure(
        tmp_path: Path, small_corpus: Path) -> None:
    import keras

    run = tmp_path / "run"
    res = run_cli("training", "train", str(small_corpus), "-o", str(run), *TINY,
                  "--epochs", "1", "--batch-size", "8", "--stateful", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stateful, 8 streams" in res.stdout
    saved = json.loads((run / "config.json").read_text())
    assert saved["stateful"] is True
    last = keras.models.load_model(run / "last.keras")
    rnn = [layer for layer in last.layers if layer.name.startswith("rnn_")]
    assert rnn
    assert all(layer.stateful for layer in rnn)

    # The best weights load into the ordinary (stateless) model, as export does, and score on
    # validation what training logged: windows of seq_len from a zero state.
    cfg = ModelConfig(**saved["model"])
    model = build_training_model(cfg)
    model.load_weights(str(run / "best.weights.h5"))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    vocab = Vocabulary(saved["vocab"])
    _, val = data.split(vocab.encode(small_corpus.read_text()), saved["val_fraction"])
    win = data.windows(val, saved["seq_len"])
    with (run / "log.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert float(model.evaluate(win[:, :-1], win[:, 1:], batch_size=8, verbose=0)) == \
        pytest.approx(float(row["val_loss"]), rel=1e-5)


def test_bundled_shakespeare_meets_its_target_and_matches_evaluate(shakespeare_path: Path
                                                                    ) -> None:
    meta = read_metadata(Path("models/shakespeare"))
    assert meta.validation is not None
    assert meta.validation.loss_nats <= 1.60
    res = run_cli("training", "evaluate", "models/shakespeare", str(shakespeare_path))
    assert res.returncode == 0, res.stderr
    recorded = {k: m.loss_nats for k, m in meta.validation.measures.items()}
    assert printed_measures(res.stdout) == pytest.approx(recorded, abs=1e-4)
    assert recorded["training_windows"] == meta.validation.loss_nats
    assert meta.onnx.file == "model.onnx"
    assert Path("models/shakespeare/model.onnx").stat().st_size < 15_000_000


def test_bundled_nietzsche_is_lowercased() -> None:
    meta = read_metadata(Path("models/nietzsche"))
    assert meta.lowercase is True
    assert not any(c.isupper() for c in meta.vocab)
