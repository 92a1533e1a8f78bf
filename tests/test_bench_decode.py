"""The decode benchmark's quick mode runs end to end and writes every result it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

# Load, soak and benchmark runs: the slow tier (`pytest -m "not slow"` skips them).
pytestmark = pytest.mark.slow

SECTIONS = {"meta", "settings", "notebook", "raw", "engine", "http_stream", "http_json",
            "server", "ratios", "targets"}


def only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"{pattern}: {found}"
    return found[0]


def test_quick_decode_bench_writes_json_markdown_and_plot(tiny_models: Path,
                                                          tmp_path: Path) -> None:
    res = run_cli("bench.decode", "--quick", "--model", str(tiny_models / "tiny"), "--out",
                  str(tmp_path), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(only(tmp_path, "decode-*.json").read_text())
    md = only(tmp_path, "decode-*.md").read_text()
    assert only(tmp_path, "decode-*.png").read_bytes().startswith(b"\x89PNG")

    assert set(report) >= SECTIONS
    assert report["meta"]["hostname"] in md
    assert {"loadavg_start", "loadavg_end", "onnxruntime", "provider", "git"} <= set(
        report["meta"])
    assert [r["batch"] for r in report["raw"]] == [1, 4]
    for section in ("engine", "http_stream", "http_json"):
        rows = report[section]
        assert [r["concurrency"] for r in rows] == [1, 4], section
        for r in rows:
            assert r["errors"] == 0, (section, r)
            assert r["generated_chars"] == r["requests"] * 20  # quick: 20 new chars each
            assert r["chars_per_s"] > 0
    assert all(r["ttft_ms"]["p50"] > 0 for r in report["http_stream"])
    assert report["notebook"]["chars_per_s"] > 0
    assert report["server"]["rss_peak_sampled_mb"] > 0
    assert [r["concurrency"] for r in report["ratios"]["by_concurrency"]] == [1, 4]
    assert {t["status"] for t in report["targets"]} <= {"PASS", "MISS", "NOT MEASURED"}
    assert len(report["targets"]) == 4
    assert "## Targets" in md
    assert res.stdout.strip() == md.strip()  # the report printed is the report written
