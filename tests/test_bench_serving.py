"""The serving benchmark: its free model builds with the project's CLI, runs in the raw loop and
serves over HTTP; its h2load and py-spy readers; and, where h2load is installed, `--quick`
end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.artifact import read_metadata
from app.runtime import RuntimeOptions, load_model
from bench.serving import (
    ServerSpec,
    build_free_model,
    check_serves,
    measure_raw,
    parse_h2load,
    servers,
    summarise_profile,
)
from tests.conftest import ROOT, run_cli

# Load, soak and benchmark runs: the slow tier (`pytest -m "not slow"` skips them).
pytestmark = pytest.mark.slow

H2LOAD_OUTPUT = """\
starting benchmark...
spawning thread #0: 4 total client(s). 8 total requests
Application protocol: http/1.1
progress: 50% done
progress: 100% done

finished in 1.52s, 5.26 req/s, 97.01KB/s
requests: 8 total, 8 started, 8 done, 7 succeeded, 1 failed, 0 errored, 0 timeout
status codes: 7 2xx, 0 3xx, 0 4xx, 1 5xx
traffic: 147.61KB (151150) total, 1.20KB (1232) headers (space savings 0.00%), 116.74KB data
                     min         max         mean         sd        +/- sd
time for request:   210.88ms       1.02s    268.95ms     41.27ms    60.00%
time for connect:      165us       165us       165us         0us   100.00%
time to 1st byte:    731us     31.46ms     12.50ms      3.2ms   100.00%
req/s           :       3.72        3.72        3.72        0.00   100.00%
"""


@pytest.fixture(scope="module")
def free_model(tmp_path_factory: pytest.TempPathFactory, shakespeare_path: Path) -> Path:
    """The benchmark's near-free model, built as the benchmark builds it (train + export)."""
    return build_free_model(tmp_path_factory.mktemp("free"), shakespeare_path)


def test_free_model_runs_in_the_raw_loop_and_serves(free_model: Path, tmp_path: Path) -> None:
    arch = read_metadata(free_model).architecture
    assert (arch.layers, arch.units) == (1, 8)
    model = load_model(free_model, RuntimeOptions(device="cpu"))
    for batch in (1, 4):
        raw = measure_raw(model, batch, chars=20, min_s=0.0)
        assert raw.rounds == 1
        assert raw.batch == batch
        assert raw.chars_per_s > 0
        assert raw.step_ms > 0
        assert raw.graph == "model.onnx"
    after = ServerSpec("after", "after", ROOT, {}, None)
    with servers([after], free_model.parent, "free", tmp_path) as (srv,):
        assert srv.graph == "model.onnx"
        # One supervisor, one engine, at least one HTTP worker, told apart by the benchmark.
        assert {"supervisor", "engine", "http worker"} <= set(srv.roles.values())
        before = srv.metrics().get("charlstm_generated_chars_total", 0.0)
        assert check_serves(srv.url, 50) == {"chars": 50, "finish_reason": "length",
                                             "generated_chars": 50}
        assert srv.metrics()["charlstm_generated_chars_total"] - before == 50
        cpu = srv.cpu_by_pid()
        assert set(cpu) >= set(srv.roles)
        assert all(t >= 0 for t in cpu.values())
    assert srv.proc.poll() is not None  # stopped on the way out


def test_h2load_output_is_read() -> None:
    got = parse_h2load(H2LOAD_OUTPUT)
    assert (got["requests"], got["succeeded"], got["failed"], got["status_2xx"]) == (8, 7, 1, 7)
    assert got["finished_s"] == 1.52
    assert got["ttfb_ms"] == {"min": 0.731, "max": 31.46, "mean": 12.5, "sd": 3.2}
    assert got["request_ms"]["max"] == 1020.0
    with pytest.raises(RuntimeError, match="cannot read h2load"):
        parse_h2load("connect failed\n")


def test_py_spy_stacks_are_summarised() -> None:
    text = ("main (app/engine/process.py:270);run (app/engine/process.py:90);"
            "step (app/runtime.py:113);run (onnxruntime/session.py:266) 60\n"
            "main (app/engine/process.py:270);run (app/engine/process.py:95);"
            "send (zmq/socket.py:713) 40\n")
    got = summarise_profile(text, rate=100, seconds=2)
    assert got["samples"] == 100
    assert got["busy_share"] == 0.5
    assert got["top_self"][0] == ["run (onnxruntime/session.py:266)", 0.6]
    incl = dict((f, s) for f, s in got["top_app_inclusive"])
    # Lines are dropped for the inclusive view, so a function counts once per stack.
    assert incl["run (app/engine/process.py)"] == 1.0
    assert incl["step (app/runtime.py)"] == 0.6


@pytest.mark.skipif(shutil.which("h2load") is None,
                    reason="h2load is not installed (apt-get install nghttp2-client; `make "
                           "bench` installs it): bench.serving drives its servers with it")
def test_quick_serving_bench_end_to_end(free_model: Path, tmp_path: Path) -> None:
    res = run_cli("bench.serving", "--quick", "--free-model", str(free_model), "--out",
                  str(tmp_path), timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    (json_path,) = tmp_path.glob("serving-*-quick.json")
    (md_path,) = tmp_path.glob("serving-*-quick.md")
    report = json.loads(json_path.read_text())
    assert {"loadavg_start", "loadavg_end", "h2load", "git"} <= set(report["meta"])
    for name, servers_expected in (("free", {"after", "after_w2"}),
                                   ("real", {"after"})):
        sec = report[name]
        rows = sec["levels"]
        assert servers_expected <= {r["server"] for r in rows}
        assert {r["level"] for r in rows} == {1, 4}
        assert {x["batch"] for x in sec["raw"]} == {1, 4}
        for r in rows:
            assert r["failed"] == 0, r
            assert r["succeeded"] == r["requests"] > 0
            # Every request streamed all its characters, as the server itself counted.
            assert r["server_chars"] == r["succeeded"] * r["chars"], r
            assert r["chars_per_s"] > 0
            assert r["ratio"] > 0
            assert r["cpu_us_per_char"] is not None  # CPU ticks are 10 ms: may round to 0
            assert r["loadgen_core_share"] > 0
    assert {t["status"] for t in report["targets"]} <= {"MET", "MISS", "NOT MEASURED"}
    for sec in (report["free"], report["real"]):
        assert all(not r["server_errors"] for r in sec["levels"]), sec["levels"]
    assert "## Targets" in md_path.read_text()
    assert res.stdout.strip() == md_path.read_text().strip()
