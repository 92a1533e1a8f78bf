"""bench.fairness runs end to end: every scenario measured, the victims served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # a benchmark


def test_quick_fairness_bench_measures_every_scenario(tmp_path: Path) -> None:
    res = run_cli("bench.fairness", "--quick", "--out", str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("fairness-*-quick.json")).read_text())
    scenarios = report["scenarios"]
    assert list(scenarios) == ["alone", "2 keys", "10 keys", "no keys (one FIFO)"]
    assert scenarios["10 keys"]["ttfc_ms"]["n"] == 9 * 3
    assert all(s["decode_period_ms"] for s in scenarios.values())
    assert next(tmp_path.glob("fairness-*-quick.md")).read_text().startswith("# Fair shares")
