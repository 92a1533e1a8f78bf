"""The training benchmarks' smoke runs: `python -m bench.training --quick` (the configuration
sweep), `--schemes --quick` and `python -m bench.training_stateful --quick` write their results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_cli

# Load, soak and benchmark runs: the slow tier (`pytest -m "not slow"` skips them).
pytestmark = pytest.mark.slow

SCHEMES = ["notebook 1x128", "ours 1x128", "ours 2x256 (shipped)"]


def test_quick_run_writes_json_and_markdown_for_every_scheme(
    tmp_path: Path, shakespeare_path: Path
) -> None:
    res = run_cli("bench.training", "--schemes", "--quick", "--corpus", str(shakespeare_path),
                  "--out", str(tmp_path), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]

    (json_path,) = tmp_path.glob("training-*-quick.json")
    (md_path,) = tmp_path.glob("training-*-quick.md")
    report = json.loads(json_path.read_text())
    assert report["quick"] is True
    assert report["machine"]["cpu_count"] >= 1
    assert len(report["load_before"]) == len(report["load_after"]) == 3
    corpus = report["corpus"]
    assert corpus["train_characters"] + corpus["val_characters"] == corpus["characters"]

    by_name = {s["name"]: s for s in report["schemes"]}
    assert list(by_name) == SCHEMES
    for s in by_name.values():
        assert s["steps"] >= 1
        assert s["target_chars_per_s"] > 0
        assert s["input_chars_per_s"] >= s["target_chars_per_s"]
        # an untrained model scores about ln(V); a few steps cannot make it much worse
        assert 0 < s["val_nats"] < 2 * math.log(corpus["vocab_size"])
        assert math.isclose(s["val_bits"], s["val_nats"] / math.log(2))
        assert s["train_time_s"] >= report["budget_s"]  # stopped by the budget, not before
    # ours: one target per input character; the notebook: one per 60-character window
    assert by_name["ours 1x128"]["input_chars_per_s"] == by_name["ours 1x128"]["target_chars_per_s"]
    nb = by_name["notebook 1x128"]
    assert math.isclose(nb["input_chars_per_s"], 60 * nb["target_chars_per_s"])
    assert nb["params"] == 4 * 128 * (corpus["vocab_size"] + 128 + 1) + 129 * corpus["vocab_size"]

    md = md_path.read_text()
    assert "| scheme | params | target chars/s | input chars/s |" in md
    for name in SCHEMES:
        assert f"| {name} |" in md


def test_quick_stateful_comparison_writes_three_measures_per_scheme(
    tmp_path: Path, shakespeare_path: Path
) -> None:
    res = run_cli("bench.training_stateful", "--quick", "--corpus", str(shakespeare_path),
                  "--out", str(tmp_path), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    (json_path,) = tmp_path.glob("training-stateful-*-quick.json")
    (md_path,) = tmp_path.glob("training-stateful-*-quick.md")
    report = json.loads(json_path.read_text())
    assert [s["name"] for s in report["schemes"]] == ["shuffled", "stateful"]
    vocab = report["corpus"]["vocab_size"]
    for s in report["schemes"]:
        assert s["steps"] >= 1
        assert s["train_time_s"] >= report["budget_s"]
        assert list(s["measures"]) == ["training_windows", "windows_256", "carried_state"]
        for m in s["measures"].values():
            assert 0 < m["nats"] < 2 * math.log(vocab)
            assert math.isclose(m["bits"], m["nats"] / math.log(2))
        carried = s["measures"]["carried_state"]
        assert carried["characters"] == report["corpus"]["val_characters"] - 1
    assert "| stateful |" in md_path.read_text()


def test_quick_sweep_measures_each_configuration_and_the_loss_of_the_fastest(
        tmp_path: Path, shakespeare_path: Path) -> None:
    res = run_cli("bench.training", "--quick", "--corpus", str(shakespeare_path),
                  "--out", str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (json_path,) = tmp_path.glob("training-sweep-*-quick.json")
    report = json.loads(json_path.read_text())
    rows = {r["name"]: r for r in report["throughput"]}
    today = rows["today: tf, batch 64, any window"]
    assert today["vs_today"] == 1.0
    for r in rows.values():
        assert r["chars_per_s"], r["runs"]
        assert all(x > 0 for x in r["chars_per_s"])
        assert r["cli"].startswith("--backend ")
    pair = [r["name"] for r in report["loss_at_equal_time"]]
    assert pair[0] == today["name"]
    assert report["fastest"] in pair
    assert report["chosen"] in pair
    vocab = 65
    for r in report["loss_at_equal_time"]:
        assert all(0 < v < 2 * math.log(vocab) for v in r["val_nats"])
    assert f"| {report['fastest']} |" in json_path.with_suffix(".md").read_text()
