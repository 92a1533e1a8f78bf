"""The GRU-vs-LSTM benchmark's parts on the session's tiny model: the engine runner decodes
what it is asked, and the table pairs the two cells per level and batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.runtime import load_model
from bench.ceiling import OPTIONS, graph_runner, host_runner
from bench.cells import STEPS, Config, engine_runner, markdown, measure

# Load, soak and benchmark runs: the slow tier (`pytest -m "not slow"` skips them).
pytestmark = pytest.mark.slow


def test_runners_decode_and_rows_pair_the_cells(tiny_models: Path, tmp_path: Path) -> None:
    from app.decode import serving_decode_graphs

    model = load_model(tiny_models / "tiny", OPTIONS)
    graphs = serving_decode_graphs(model, STEPS, OPTIONS)
    assert graphs is not None
    engine = engine_runner(model)
    assert engine(3, 2 * STEPS) > 0
    runners = {(cell, kind): run for cell in ("lstm", "gru")
               for kind, run in (("host", host_runner(model)),
                                 ("graph", graph_runner(model, graphs.steps)),
                                 ("engine", engine))}
    rows = measure(Config(batches=[1, 2], rounds=2, corpus=tmp_path, out=tmp_path, quick=True),
                   runners)
    assert [(r["batch"], r["kind"]) for r in rows] == [
        (b, k) for b in (1, 2) for k in ("host", "graph", "engine")]
    for r in rows:
        assert r["lstm_chars_per_s"] > 0
        assert r["gru_chars_per_s"] > 0
        assert r["gru_speed_over_lstm"] > 0
    text = markdown({"meta": {"hostname": "h", "started": "2026-11-23T00:00:00", "cpu": "c",
                              "cpu_count_logical": 2, "loadavg_start": [0], "loadavg_end": [0],
                              "onnxruntime": "1"},
                     "settings": {"rounds": 2},
                     "models": {"lstm": {"shape": "2 x LSTM(48)", "parameters": 1, "op": "LSTM",
                                         "decode_graph": "decode.k8.onnx"}},
                     "results": rows})
    assert text.count("| engine |") == 2
