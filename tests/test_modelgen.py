"""tests/modelgen.py: a model folder written without TensorFlow loads, decodes and serves like an
exported one."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from app.decode import load_decode_graph
from app.main import create_app
from app.runtime import RuntimeOptions, load_model
from app.settings import Settings
from tests.modelgen import UNICODE_VOCAB, build_model


def test_generated_model_loads_with_the_exporters_contract(unicode_models: Path) -> None:
    model = load_model(unicode_models / "unicode", RuntimeOptions(device="cpu"))
    assert model.vocab.chars == UNICODE_VOCAB
    assert model.state_in == ["h0", "c0"]
    assert model.state_out == ["h0_out", "c0_out"]
    assert model.meta.corpus.name == "synthetic"
    assert {d.steps for d in model.meta.decode_graphs} == {1, 8}
    for k in (1, 8):
        assert load_decode_graph(unicode_models / "unicode", k).steps == k
    logits, _states = model.run_numpy(np.array([[0, 1, 2]], np.int32),
                                     [np.zeros((1, 8), np.float32)] * 2)
    assert logits.shape == (1, 3, len(UNICODE_VOCAB))
    # Not uniform noise: the state carries the characters fed, and some characters are likelier.
    assert not np.allclose(logits[0, 0], logits[0, 2])
    assert float(np.ptp(logits[0, -1])) > 2.0


def test_generated_models_are_deterministic_and_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    a = build_model(tmp_path / "a", "m", list("abc \n"), units=16, layers=2, seed=3)
    elapsed = time.perf_counter() - start
    b = build_model(tmp_path / "b", "m", list("abc \n"), units=16, layers=2, seed=3,
                    decode_steps=(), lowercase=True)
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    assert load_model(b).meta.lowercase
    assert not load_model(a).meta.lowercase
    assert len(load_model(a).state_in) == 4
    assert elapsed < 2.0, f"building a model took {elapsed:.2f} s"


def test_logit_bias_makes_a_character_dominant(tmp_path: Path) -> None:
    path = build_model(tmp_path, "m", list("abc"), decode_steps=(), logit_bias={"b": 30.0})
    logits, _ = load_model(path).run_numpy(np.zeros((1, 4), np.int32),
                                           [np.zeros((1, 8), np.float32)] * 2)
    assert (logits.argmax(-1) == 1).all()


def test_generated_model_serves_in_process(unicode_models: Path) -> None:
    app = create_app(Settings(models_dir=unicode_models, default_model="unicode"))
    with TestClient(app) as client:
        info = client.get("/models/unicode").json()
        assert info["vocab"] == UNICODE_VOCAB
        assert info["decode_graph"] is not None
        r = client.post("/generate", json={"seed_text": "中文", "max_new_chars": 64,
                                           "seed": 1, "temperature": 1.0})
        assert r.status_code == 200, r.text
        assert len(r.json()["text"]) == 64
        assert set(r.json()["text"]) <= set(UNICODE_VOCAB)
