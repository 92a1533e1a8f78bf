"""POST /admin/reload behind a proxy, over real connections from other loopback addresses
(issue 20, point 5): the issue's `curl --interface 127.0.0.6 -X POST .../admin/reload -H
'X-Forwarded-For: 203.0.113.5'` answered 200. One setting (CHARLSTM_TRUSTED_PROXIES) decides
which peers' forwarded headers uvicorn believes and which peers are proxies to the admin guard;
keyless admin access is an explicit opt-in (CHARLSTM_ADMIN_LOCAL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import InProcessServer

PASSED = 501  # past the guard: this layout (engines on threads) cannot reload


def post(srv: InProcessServer, source: str, headers: dict[str, str] | None = None
         ) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(base_url=srv.url, transport=transport, timeout=30) as c:
        return c.post("/admin/reload", headers=headers)


@pytest.fixture(scope="module")
def opted_in(tiny_models: Path) -> Iterator[InProcessServer]:
    srv = InProcessServer(tiny_models, admin_local=True)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def behind_sidecar(tiny_models: Path) -> Iterator[InProcessServer]:
    srv = InProcessServer(tiny_models, admin_local=True, trusted_proxies=["127.0.0.6"])
    yield srv
    srv.stop()


def test_the_issues_curl_from_127_0_0_6_forwarding_a_remote_address_is_refused(
        opted_in: InProcessServer) -> None:
    reply = post(opted_in, "127.0.0.6", {"X-Forwarded-For": "203.0.113.5"})
    assert reply.status_code == 403
    assert "not through a proxy" in reply.json()["error"]["message"]
    assert post(opted_in, "127.0.0.1").status_code == PASSED  # curl on this host


def test_a_trusted_sidecar_forwards_the_remote_address_and_is_never_local(
        behind_sidecar: InProcessServer) -> None:
    forwarded = post(behind_sidecar, "127.0.0.6", {"X-Forwarded-For": "203.0.113.5"})
    assert forwarded.status_code == 403
    # uvicorn believed the header: the one trust list reached it.
    assert "caller seen as 203.0.113.5" in forwarded.json()["error"]["message"]
    # Forwarding nobody (nginx's plain proxy_pass) does not make its callers local.
    assert post(behind_sidecar, "127.0.0.6").status_code == 403
    assert post(behind_sidecar, "127.0.0.1").status_code == PASSED


def test_without_the_opt_in_nobody_reloads_without_a_key(server: InProcessServer) -> None:
    reply = post(server, "127.0.0.1")
    assert reply.status_code == 403
    assert "CHARLSTM_ADMIN_LOCAL=true" in reply.json()["error"]["message"]
