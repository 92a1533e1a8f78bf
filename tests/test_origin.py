"""A web page cannot drive the service (issue 26, point 4): a Host that is not a loopback name
is refused by a service bound to loopback (DNS rebinding), and a state-changing request from
another site's page (its Origin) is refused whatever the binding. Both before the body is read.

The header matrix runs in process: the app through httpx's ASGI transport, whose requests say
they arrived on the URL's host (scope["server"]), with no lifespan (no model is loaded):
`POST /admin/reload` answering 501 ("restart it") means a request got past the middleware."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from app.main import create_app
from app.settings import Settings
from tests.conftest import start_server, stop_server

PASSED = 501  # POST /admin/reload under this layout, once past every check


def call(settings: Settings, headers: dict[str, str], method: str = "POST",
         path: str = "/admin/reload", url: str = "http://127.0.0.1:8000",
         content: bytes = b"") -> httpx.Response:
    app = create_app(settings)

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url=url) as c:
            return await c.request(method, path, headers=headers, content=content)

    return asyncio.run(send())


def settings(**kw: object) -> Settings:
    # admin_local: without keys POST /admin/reload is otherwise refused for everyone (403).
    kw = {"admin_local": True, **kw}
    return Settings(models_dir=Path("models"), default_model="tiny", **kw)  # type: ignore[arg-type]


def refusal(reply: httpx.Response) -> str:
    assert reply.status_code == 403, reply.text
    body = reply.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == "forbidden"
    return str(body["error"]["message"])


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000",
                                  "127.0.0.2", "app.localhost:8000", "localhost."])
def test_a_loopback_service_answers_to_loopback_names(host: str) -> None:
    assert call(settings(), {"Host": host}).status_code == PASSED


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "192.168.1.5",
                                  "localhost.attacker.example", "[2001:db8::1]:8000"])
def test_a_loopback_service_refuses_other_hosts_even_for_get(host: str) -> None:
    message = refusal(call(settings(), {"Host": host}))
    assert f"Host {host!r} is refused" in message
    assert "CHARLSTM_ALLOWED_HOSTS" in message
    refusal(call(settings(), {"Host": host}, "GET", "/models"))


@pytest.mark.parametrize("host", ["a b", "x:port", "evil.example/path", "[::1"])
def test_a_host_header_that_is_no_host_is_refused(host: str) -> None:
    assert "is not a host name" in refusal(call(settings(host="0.0.0.0"), {"Host": host}))


def test_a_service_bound_elsewhere_answers_to_any_host_unless_listed() -> None:
    assert call(settings(host="0.0.0.0"), {"Host": "attacker.example"}).status_code == PASSED
    assert call(settings(host="::"), {"Host": "10.1.2.3:8000"}).status_code == PASSED
    # `uvicorn app.main:app --host 0.0.0.0` leaves CHARLSTM_HOST at 127.0.0.1: a request that
    # came in on another address shows the service listens there too.
    assert call(settings(), {"Host": "pod.example"}, url="http://10.0.0.7:8000"
                ).status_code == PASSED
    listed = settings(host="0.0.0.0", allowed_hosts="api.example.com,*.example.org")
    for host in ("api.example.com", "API.example.com:443", "a.example.org", "b.a.example.org",
                 "localhost:8000", "127.0.0.1"):
        assert call(listed, {"Host": host}).status_code == PASSED, host
    for host in ("example.org", "api.example.com.evil", "other.example"):
        assert "and the names in CHARLSTM_ALLOWED_HOSTS" in refusal(call(listed, {"Host": host}))
    assert call(settings(allowed_hosts="*"), {"Host": "anything.example"}).status_code == PASSED


def test_a_foreign_origin_is_refused_for_state_changing_methods_only() -> None:
    s = settings()
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        message = refusal(call(s, {"Origin": "http://attacker.example"}, method))
        assert f"a {method} from Origin 'http://attacker.example' is refused" in message
        assert "CHARLSTM_CORS_ORIGINS" in message
    for origin in ("http://127.0.0.1:9999", "http://localhost:8000", "null", "file://",
                   "http://127.0.0.1:8000.attacker.example", "ftp://127.0.0.1:8000"):
        refusal(call(s, {"Origin": origin}))
    # Reading is not changing (and the Host check stops a rebinding page from reading).
    assert call(s, {"Origin": "http://attacker.example"}, "GET", "/health").status_code == 200


def test_the_same_origin_and_listed_origins_and_callers_without_one_pass() -> None:
    s = settings()
    for origin in ("http://127.0.0.1:8000", "https://127.0.0.1:8000", "HTTP://127.0.0.1:8000/"):
        assert call(s, {"Origin": origin}).status_code == PASSED, origin
    assert call(s, {"Host": "localhost", "Origin": "http://localhost"}).status_code == PASSED
    assert call(s, {"Host": "localhost", "Origin": "http://localhost:80"}).status_code == PASSED
    assert call(s, {}).status_code == PASSED  # curl, SDKs, servers: no Origin
    cors = settings(cors_origins="https://app.example.com")
    reply = call(cors, {"Origin": "https://app.example.com"})
    assert reply.status_code == PASSED
    assert reply.headers["access-control-allow-origin"] == "https://app.example.com"
    # A refusal carries CORS headers too, when the origin is listed (here: a foreign Host).
    refused = call(cors, {"Origin": "https://app.example.com", "Host": "attacker.example"})
    assert refused.headers["access-control-allow-origin"] == "https://app.example.com"
    assert call(settings(allowed_hosts="app.example.com"),
                {"Origin": "https://app.example.com"}).status_code == PASSED
    # "*" opens the Host, not the Origin: any name may reach it, no page may drive it.
    refusal(call(settings(allowed_hosts="*"), {"Origin": "https://attacker.example"}))


def test_a_cross_site_fetch_without_origin_is_refused() -> None:
    message = refusal(call(settings(), {"Sec-Fetch-Site": "cross-site"}))
    assert "Sec-Fetch-Site: cross-site" in message
    assert call(settings(), {"Sec-Fetch-Site": "same-origin"}).status_code == PASSED


def test_refusals_come_before_the_key_check_and_the_body() -> None:
    keyed = settings(api_keys="k1", max_body_bytes=1024)
    big = b"x" * 4096  # over the body limit: read, it would be a 413
    assert call(keyed, {"Host": "attacker.example", "Authorization": "Bearer k1"},
                content=big).status_code == 403
    reply = call(keyed, {"Origin": "http://attacker.example"}, content=big)
    assert reply.status_code == 403
    assert reply.headers["connection"] == "close"
    assert call(keyed, {"Authorization": "Bearer k1"}, content=big).status_code == 413


def test_allowed_hosts_takes_names_not_urls() -> None:
    for bad in ("http://api.example.com", "api.example.com:8000"):
        with pytest.raises(ValidationError, match="takes host names"):
            settings(allowed_hosts=bad)
    assert settings(allowed_hosts="[::1], 2001:db8::1").allowed_hosts == ["[::1]", "2001:db8::1"]


# --- a real `python -m app` -------------------------------------------------------------------

@pytest.mark.slow  # a browser
def test_a_page_cannot_reload_a_keyless_loopback_service_but_the_playground_generates(
        tiny_models: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_models, tmp_path / "server.log", admin_local="true")
    own = srv.url  # http://127.0.0.1:PORT, what the playground page's Origin is
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            # The curl: a rebinding page (foreign Host and Origin) ...
            attack = c.post("/admin/reload", headers={"Host": "attacker.example",
                                                      "Origin": "http://attacker.example"})
            assert "Host 'attacker.example' is refused" in refusal(attack)
            # ... and a plain cross-site form post (right Host, foreign Origin).
            csrf = c.post("/admin/reload", headers={"Origin": "http://attacker.example"})
            assert "Origin 'http://attacker.example' is refused" in refusal(csrf)
            assert c.post("/generate", headers={"Origin": "http://attacker.example"},
                          json={"max_new_chars": 5}).status_code == 403
            # The playground: same origin.
            page = c.get("/")
            assert page.status_code == 200
            gen = c.post("/generate", headers={"Origin": own},
                         json={"seed_text": "A", "max_new_chars": 10})
            assert gen.status_code == 200, gen.text
            assert len(gen.json()["text"]) == 10
            assert c.post("/admin/reload").status_code == 200  # curl from this host
    finally:
        stop_server(srv)
