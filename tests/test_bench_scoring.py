"""bench.scoring runs end to end: its rates come from real /score requests and its held-out
figure from a real lm-eval run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # a benchmark


def test_quick_scoring_bench_measures_served_raw_and_lm_eval(tmp_path: Path) -> None:
    res = run_cli("bench.scoring", "--quick", "--out", str(tmp_path), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("scoring-*-quick.json")).read_text())
    for level in ("1", "16"):
        served = report["levels"][level]["served"]
        assert served["requests"] == int(level)
        assert served["chars_per_s"] > 0
        assert report["levels"][level]["raw_prefill_chars_per_s"] > 0
    held = report["heldout"]["shakespeare"]
    assert held["documents"] >= 1
    assert 1.0 < held["bits_per_char"] < 4.0
    assert next(tmp_path.glob("scoring-*-quick.md")).read_text().startswith("# Scoring")
