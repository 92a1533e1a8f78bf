"""bench.state_cache runs end to end and its figures come from real cache hits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

# Load, soak and benchmark runs: the slow tier (`pytest -m "not slow"` skips them).
pytestmark = pytest.mark.slow


def test_quick_state_cache_bench_measures_hits(tmp_path: Path) -> None:
    res = run_cli("bench.state_cache", "--quick", "--out", str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("state-cache-*-quick.json")).read_text())
    assert any('result="hit"} 3.0' in line for line in report["cache_metrics"])
    assert report["first_char_ms_server"]["with cache (seed seen before)"]["n"] == 3
    assert next(tmp_path.glob("state-cache-*-quick.md")).read_text().startswith("# State cache")
