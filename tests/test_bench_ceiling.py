"""The ceiling benchmark's quick mode runs end to end and writes what it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

# Load, soak and benchmark runs: the slow tier (`pytest -m "not slow"` skips them).
pytestmark = pytest.mark.slow


def test_quick_ceiling_bench_writes_json_and_markdown(tiny_models: Path, tmp_path: Path) -> None:
    res = run_cli("bench.ceiling", "--quick", "--model", str(tiny_models / "tiny"), "--batches",
                  "1,4", "--steps", "1,2", "--out", str(tmp_path), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    (json_path,) = tmp_path.glob("ceiling-*-quick.json")
    (md_path,) = tmp_path.glob("ceiling-*-quick.md")
    report = json.loads(json_path.read_text())
    # The tiny model has no int8 variant: fp32 host and one graph per K, at each batch size.
    assert sorted({r["variant"] for r in report["results"]}) == [
        "fp32 graph K=1", "fp32 graph K=2", "fp32 host"]
    assert sorted(r["batch"] for r in report["results"]) == [1, 1, 1, 4, 4, 4]
    for r in report["results"]:
        assert r["chars_per_s"] > 0
        assert r["chars_per_round"] % 2 == 0
        if r["variant"] == "fp32 host":
            assert r["ratio_to_fp32_host"] == 1
    assert set(report["winners"]) == {"1", "4"}
    (agree,) = report["agreement"]
    assert agree["greedy_identical"] == agree["greedy_rows"] > 0
    assert agree["identical_rows"] >= 0.999 * agree["rows"]
    assert res.stdout.strip() == md_path.read_text().strip()
