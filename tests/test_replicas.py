"""Two replicas behind a load balancer, on this machine (issue 20, point 4): two `python -m app`
on two loopback ports behind Debian's nginx, routing on a hash of X-Session-Id (as
deploy/k8s/gateway/affinity.yaml does on Envoy Gateway). A continuation issued by replica A
finishes on replica B, a repeated seed hits the cache of the replica its session goes to, and
a replica stopped mid-load (SIGTERM, what an orchestrator sends) ends only its own streams,
each with an error event, while nginx sends everything else to the other.

nginx comes from `make nginx` (a dependency of `make test`); without it the test is skipped."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ProcessServer, free_port, start_server, stop_server

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = [
    pytest.mark.slow,  # nginx and real server processes
    pytest.mark.skipif(
        NGINX is None, reason="nginx is not installed (run `make nginx`: "
        "Debian's nginx-light, as root)",
    ),
]
KEY = {"Authorization": "Bearer replica-key"}
SEED = "the king is dead and the queen is gone, " * 20  # 800 characters: cached by prefix

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream replicas {{
        hash $http_x_session_id consistent;
        server 127.0.0.1:{a} max_fails=1 fail_timeout=30s;
        server 127.0.0.1:{b} max_fails=1 fail_timeout=30s;
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_read_timeout 120s;
            # A replica that is gone (refused) or not admitting (503: draining, nothing
            # started): the next one. 503 is never an admitted generation, so a POST may be
            # sent again.
            proxy_next_upstream error http_503 non_idempotent;
            add_header X-Replica $upstream_addr always;
        }}
    }}
}}
"""


@dataclass
class Balancer:
    url: str
    proc: subprocess.Popen[bytes]
    dir: Path


@dataclass
class Replicas:
    a: ProcessServer
    b: ProcessServer
    lb: Balancer
    sessions: dict[str, list[str]] = field(default_factory=dict)  # port -> session ids

    def port(self, srv: ProcessServer) -> str:
        return srv.url.rsplit(":", 1)[1]


def start_nginx(tmp: Path, a: ProcessServer, b: ProcessServer) -> Balancer:
    assert NGINX is not None
    port = free_port()
    tmp.mkdir()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp, a=a.url.rsplit(":", 1)[1],
                                      b=b.url.rsplit(":", 1)[1], port=port))
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {(tmp / 'error.log').read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return Balancer(url, proc, tmp)
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("nginx did not answer")


@pytest.fixture
def replicas(tiny_models: Path, tmp_path: Path) -> Iterator[Replicas]:
    env = {"api_keys": "replica-key;name=caller", "continuation_key": "shared-secret",
           "http_workers": "1", "drain_s": "1", "watch_models": "false",
           "max_new_chars": "1000000"}
    a = start_server(tiny_models, tmp_path / "a.log", **env)
    b = start_server(tiny_models, tmp_path / "b.log", **env)
    lb = start_nginx(tmp_path / "nginx", a, b)
    try:
        r = Replicas(a, b, lb)
        # Which session ids the hash sends where (a ring hash: fixed for these two servers).
        with httpx.Client(base_url=lb.url, timeout=30, headers=KEY) as c:
            for i in range(64):
                sid = f"session-{i}"
                reply = c.get("/models", headers={"X-Session-Id": sid})
                assert reply.status_code == 200
                port = reply.headers["X-Replica"].rsplit(":", 1)[1]
                r.sessions.setdefault(port, []).append(sid)
        assert len(r.sessions) == 2, r.sessions
        yield r
    finally:
        lb.proc.terminate()
        lb.proc.wait(10)
        stop_server(a)
        stop_server(b)


def served_by(reply: httpx.Response) -> str:
    return reply.headers["X-Replica"].split(",")[-1].strip().rsplit(":", 1)[1]


def cache_hits(srv: ProcessServer) -> float:
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("charlstm_state_cache_lookups_total{") and 'result="hit"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def read_stream(url: str, session: str, body: dict[str, Any], started: threading.Event,
                out: dict[str, Any], stop: threading.Event) -> None:
    """One SSE stream through the balancer: (event, data) pairs, and who served it; leaves
    (cancelling it) once `stop` is set."""
    events: list[tuple[str, Any]] = []
    out["events"] = events
    try:
        with httpx.Client(timeout=60) as c, c.stream(
                "POST", f"{url}/generate", json=body,
                headers={**KEY, "X-Session-Id": session, "Accept": "text/event-stream"}) as r:
            out["status"] = r.status_code
            out["replica"] = served_by(r)
            name = "message"
            for line in r.iter_lines():
                if stop.is_set():
                    out["left"] = True
                    return
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    events.append((name, json.loads(line[5:])))
                    started.set()
                elif not line:
                    name = "message"
    except httpx.HTTPError as exc:
        out["transport_error"] = repr(exc)
    finally:
        started.set()


def test_two_replicas_continue_cache_and_lose_only_the_stopped_ones_streams(
        replicas: Replicas) -> None:
    r = replicas
    pa, pb = r.port(r.a), r.port(r.b)
    on_a, on_b = r.sessions[pa], r.sessions[pb]
    with httpx.Client(base_url=r.lb.url, timeout=60, headers=KEY) as c:
        # 1. A continuation issued by A finishes on B: the two halves are the one request.
        body = {"seed_text": "the king ", "max_new_chars": 40, "seed": 7, "temperature": 0.8}
        whole = c.post("/generate", json=body, headers={"X-Session-Id": on_a[0]})
        first = c.post("/generate", json={**body, "max_new_chars": 20, "resumable": True},
                       headers={"X-Session-Id": on_a[0]})
        assert (served_by(first), first.status_code) == (pa, 200)
        rest = c.post("/generate", json={"continuation": first.json()["continuation"],
                                         "max_new_chars": 20},
                      headers={"X-Session-Id": on_b[0]})
        assert (served_by(rest), rest.status_code) == (pb, 200), rest.text
        assert first.json()["text"] + rest.json()["text"] == whole.json()["text"]

        # 2. A repeated seed goes where its session goes, and hits that replica's cache.
        hits_a, hits_b = cache_hits(r.a), cache_hits(r.b)
        for _ in range(3):
            reply = c.post("/generate", json={"seed_text": SEED, "max_new_chars": 5},
                           headers={"X-Session-Id": on_b[1]})
            assert (served_by(reply), reply.status_code) == (pb, 200)
        assert cache_hits(r.b) - hits_b >= 2  # the 2nd and 3rd found the seed
        assert cache_hits(r.a) == hits_a

    # 3. Streams on both; A is stopped (SIGTERM, a 1 s drain): its streams end with an error
    #    event and `done`, B's run on; new requests for A's sessions reach B.
    body = {"seed_text": "the ", "max_new_chars": 1_000_000, "stream": True}
    stop = threading.Event()
    streams: list[tuple[str, dict[str, Any], threading.Thread]] = []
    for sid in [*on_a[:3], *on_b[:3]]:
        out: dict[str, Any] = {}
        started = threading.Event()
        t = threading.Thread(target=read_stream, args=(r.lb.url, sid, body, started, out, stop))
        t.start()
        assert started.wait(30)
        streams.append((sid, out, t))
    assert [o["replica"] for _, o, _ in streams] == [pa] * 3 + [pb] * 3
    r.a.proc.send_signal(signal.SIGTERM)

    def short(c: httpx.Client, sid: str) -> tuple[int, str]:
        reply = c.post("/generate", json={"seed_text": "the ", "max_new_chars": 10},
                       headers={"X-Session-Id": sid})
        return reply.status_code, served_by(reply)

    with httpx.Client(base_url=r.lb.url, timeout=60, headers=KEY) as c:
        # While A drains: never an error (A still finishes what it admitted before the
        # signal reached it; refused with 503 after, which nginx sends on to B) ...
        during = []
        for sid in on_a[3:6]:
            during.append(short(c, sid))
            time.sleep(0.3)
        assert [code for code, _ in during] == [200] * 3, during
        assert during[-1][1] == pb
        assert r.a.proc.wait(30) == 0
        # ... and once A is gone, its sessions are B's.
        assert [short(c, sid) for sid in on_a[3:9]] == [(200, pb)] * 6
    on_b_streams = [(out, len(out["events"])) for _, out, _ in streams[3:]]
    time.sleep(0.5)
    assert all(len(out["events"]) > n for out, n in on_b_streams), "B's streams stopped"
    stop.set()
    for _, _, t in streams:
        t.join(60)
    for sid, out, _ in streams:
        events = out["events"]
        assert "transport_error" not in out, (sid, out.get("transport_error"))
        names = [name for name, _ in events]
        if out["replica"] == pa:
            assert names[-1] == "done", (sid, names[-3:])
            (error,) = [data for name, data in events if name == "error"]
            assert "drain time" in json.dumps(error)
            assert events[-1][1]["finish_reason"] == "error"
        else:
            assert out.get("left"), sid  # still running when this reader left
            assert "error" not in names
            assert "done" not in names
