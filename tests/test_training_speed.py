"""Issue 21: each Keras backend trains, resumes and exports a model that serves; the speed
settings are chosen, printed and recorded; the progress line and the final throughput."""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.artifact import read_metadata
from app.runtime import RuntimeOptions, load_model
from tests.conftest import ROOT, run_cli
from training.generate import generate
from training.speed import CPU_DEFAULT, Speed, chosen_speed

pytestmark = pytest.mark.slow  # TensorFlow: trains with each backend

TINY = ["--units", "8", "--embedding-dim", "4", "--layers", "1", "--seq-len", "20",
        "--sample-length", "5", "--steps-per-epoch", "2", "--quiet"]
BACKENDS = ["tensorflow", *(["jax"] if importlib.util.find_spec("jax") else [])]
THROUGHPUT = re.compile(r"^throughput: [\d,]+ target characters per second of training",
                        re.MULTILINE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_trains_resumes_and_exports_a_model_that_serves(
        backend: str, tmp_path: Path, small_corpus: Path) -> None:
    run, models = tmp_path / "run", tmp_path / "models"
    res = run_cli("training", "train", str(small_corpus), "-o", str(run), *TINY,
                  "--epochs", "1", "--backend", backend)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "speed settings from the fastest on a CPU" in res.stdout
    assert THROUGHPUT.search(res.stdout), res.stdout[-2000:]
    saved = json.loads((run / "config.json").read_text())
    assert saved["backend"] == backend
    assert saved["speed"] == CPU_DEFAULT.to_dict()

    # --resume continues from last.keras with the same backend, then exports (in a process
    # of its own, with TensorFlow's Keras) into the models folder.
    res = run_cli("training", "train", str(small_corpus), "-o", str(run), *TINY, "--epochs", "2",
                  "--backend", backend, "--resume", "--name", "m", "--models-dir", str(models))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "state.json").read_text())["epochs_done"] == 2
    meta = read_metadata(models / "m")
    assert meta.training["backend"] == backend
    assert meta.training["speed"] == CPU_DEFAULT.to_dict()
    assert meta.training["epochs"] == 2

    model = load_model(models / "m", RuntimeOptions(device="cpu"))
    (text,) = generate(model.run_numpy, model.vocab, "ROMEO:", [1.0], 12,
                       len(model.state_in), model.state_sizes[0], np.random.default_rng(0))
    assert len(text) == 12
    assert set(text) <= set(model.vocab.chars)


def test_options_given_override_the_cpu_default_and_are_named() -> None:
    speed, source = chosen_speed(False, threads=1, jit_compile=None, precision=None,
                                 fixed_window=False, pipeline=None)
    assert speed == Speed(**{**CPU_DEFAULT.to_dict(), "threads": 1, "fixed_window": False})
    assert source.endswith("with threads=1, fixed_window=False")
    assert chosen_speed(True)[0] == Speed()  # a GPU host keeps Keras's own settings


def test_mixed_bfloat16_trains_and_its_weights_export_as_float32(
        tmp_path: Path, small_corpus: Path) -> None:
    run = tmp_path / "run"
    res = run_cli("training", "train", str(small_corpus), "-o", str(run), *TINY,
                  "--epochs", "1", "--precision", "mixed_bfloat16", "--name", "bf",
                  "--models-dir", str(tmp_path / "models"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mixed_bfloat16" in res.stdout
    assert json.loads((run / "config.json").read_text())["speed"]["precision"] == "mixed_bfloat16"
    assert read_metadata(tmp_path / "models" / "bf").parity["greedy_match"] is True


def test_a_terminal_gets_a_progress_line_with_chars_per_s_and_time_left(
        tmp_path: Path, small_corpus: Path) -> None:
    """On a terminal the line is rewritten in place (CR); it ends before each epoch line."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "training", "train", str(small_corpus), "-o", str(tmp_path / "r"),
         *[a for a in TINY if a != "--quiet"], "--epochs", "1", "--steps-per-epoch", "6"],
        cwd=ROOT, stdout=secondary, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.wait(timeout=300) == 0
    out = b"".join(chunks).decode("utf-8", "replace")
    progress = re.findall(r"\repoch 1/1: batch (\d+)/6, loss [\d.]+, ([\d,]+) chars/s, "
                          r"(\d+) s left", out)
    assert progress, out[-2000:]
    assert progress[-1][0] == "6"  # the last batch: nothing left
    assert progress[-1][2] == "0"
    assert re.search(r"\r\x1b\[K\r?\n?epoch 1/1: loss [\d.]+ nats/char .* chars/s", out)
    assert THROUGHPUT.search(out.replace("\r\n", "\n"))
