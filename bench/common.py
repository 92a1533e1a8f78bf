"""Helpers any benchmark here can share: machine facts, latency summaries, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not every platform has one
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=False)
        return res.stdout.strip() if res.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    # Only tracked files count: results written under bench/results must not make it dirty.
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {"commit": commit or None, "dirty": dirty}


def gpu_name() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    res = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=10, check=False)
    names = [n.strip() for n in res.stdout.splitlines() if n.strip()]
    return ", ".join(names) if res.returncode == 0 and names else None


def machine_facts() -> dict[str, Any]:
    import onnxruntime as ort
    import psutil

    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count_logical": psutil.cpu_count(logical=True),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": list(ort.get_available_providers()),
        "gpu": gpu_name(),
        "git": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def latency_ms(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p90/p99/mean/max in milliseconds of samples given in seconds (None when empty)."""
    if not len(seconds):
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "p50": round(float(p50), 3), "p90": round(float(p90), 3),
            "p99": round(float(p99), 3), "mean": round(float(a.mean()), 3),
            "max": round(float(a.max()), 3)}


def result_stem(out: Path, bench: str, suffix: str = "") -> Path:
    """bench/results/<bench>-<host>-<YYYYMMDD><suffix>, without an extension."""
    host = re.sub(r"[^A-Za-z0-9_.-]+", "_", socket.gethostname()) or "host"
    return out / f"{bench}-{host}-{time.strftime('%Y%m%d')}{suffix}"


def write_results(out: Path, bench: str, quick: bool, report: Any,
                  text: str) -> tuple[Path, Path]:
    """<bench>-<host>-<YYYYMMDD>[-quick].json (the report) and .md (`text`), the Markdown also
    printed; returns both paths."""
    stem = result_stem(out, bench, "-quick" if quick else "")
    # Not with_suffix: a dotted host name would lose its last part.
    json_path, md_path = (stem.parent / f"{stem.name}.{ext}" for ext in ("json", "md"))
    write_json(json_path, report)
    md_path.write_text(text, encoding="utf-8")
    print(text)
    return json_path, md_path


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def cell(v: Any) -> str:
    """A number as a table shows it: thousands separated, small ones to 3 significant digits."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def shown(path: Path) -> str:
    """Paths inside the repository relative to it, so results read the same on every host."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def int_list(text: str, most: int | None = None) -> list[int]:
    """A comma-separated list of positive integers (at most `most`), sorted, without repeats:
    the levels and batch sizes the benchmarks take on their command lines."""
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None
    if not values or values[0] < 1 or (most is not None and values[-1] > most):
        bound = f"[1, {most}]" if most is not None else "positive"
        raise argparse.ArgumentTypeError(f"expected integers in {bound}, got {text!r}")
    return values


def start_service(settings: dict[str, str], log: Path, timeout_s: float = 180.0
                  ) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m app` on a free port with these CHARLSTM_* settings (names without the
    prefix), its output in `log`; (the process, its URL) once /ready answers 200."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {**os.environ, "CHARLSTM_PORT": str(port),
           **{f"CHARLSTM_{k.upper()}": v for k, v in settings.items()}}
    proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")
