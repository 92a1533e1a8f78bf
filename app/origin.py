"""Host and Origin checks: a web page the user visits must not drive this service.

Any page can send a bodiless or form-encoded POST to http://127.0.0.1:8000/ (browsers send it,
and only keep the reply from the page), so a keyless service on the loopback interface would
reload its models or generate at a page's will. With DNS rebinding (the page's own name
resolved to 127.0.0.1 a moment later) the page can also read the replies. The defences are
those of Jupyter and Ollama, decided from the headers alone, before any body is read:

- Host: a service listening on a loopback address answers only to loopback names (localhost,
  *.localhost, 127.0.0.0/8, [::1]) and to the names in CHARLSTM_ALLOWED_HOSTS. A rebinding
  page sends its own name as Host, so it is refused. A service listening on 0.0.0.0, :: or
  another address cannot know the names it is reached by (a load balancer's, a pod's IP), so
  by default it answers to any; set CHARLSTM_ALLOWED_HOSTS to name them.
- Origin: a state-changing request (POST, PUT, PATCH, DELETE) that carries an Origin is served
  only when that Origin is the request's own host (same host and port as its Host header: the
  playground page), one of CHARLSTM_CORS_ORIGINS, or a host named in CHARLSTM_ALLOWED_HOSTS.
  Requests without an Origin (curl, SDKs, servers) are not from a page, and pass; a browser's
  request without one that says it is cross-site (Sec-Fetch-Site) is refused like a foreign
  Origin.

Refusals are 403 with the service's error shape and name the header and the setting to change.
403 rather than 421 Misdirected Request: 421 tells a client to retry on another connection,
which would only repeat the refusal.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import ForbiddenError, error_response

# Requests that change nothing here (OPTIONS is a CORS preflight); a page's GET is harmless
# unless DNS rebinding lets it read the reply, which the Host check stops.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def is_loopback(host: str) -> bool:
    """A loopback address or name: 127.0.0.0/8, ::1 (also IPv4-mapped), localhost and its
    subdomains (RFC 6761: they never leave the machine)."""
    host = host.strip("[]").lower().removesuffix(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header's (name, port): the name lowercased, without brackets or a final dot;
    None when it is not a host[:port] at all."""
    if not value or any(c in value for c in "/?#@\\ \t"):
        return None
    try:
        parts = urlsplit(f"//{value}")
        name, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number, an unclosed bracket
        return None
    if not name:
        return None
    return name.removesuffix("."), port


class HostPattern:
    """CHARLSTM_ALLOWED_HOSTS: names ("example.com", "10.0.0.5", "[::1]"), subdomain patterns
    ("*.example.com": the subdomains, not the name itself), or "*" (any)."""

    def __init__(self, entries: Sequence[str]) -> None:
        names = [e.strip().lower().strip("[]").removesuffix(".") for e in entries if e.strip()]
        self.any = "*" in names
        self.exact = frozenset(n for n in names if not n.startswith("*."))
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))

    def named(self, host: str) -> bool:
        """Named by an entry (not by "*")."""
        return host in self.exact or host.endswith(self.suffixes)


class OriginMiddleware:
    def __init__(self, app: ASGIApp, bind_host: str, allowed_hosts: Sequence[str],
                 cors_origins: Sequence[str]) -> None:
        self.app = app
        self.loopback_bind = is_loopback(bind_host)
        self.allowed = HostPattern(allowed_hosts)
        self.listed = bool(allowed_hosts)
        self.cors_any = "*" in cors_origins
        self.cors = frozenset(o.strip().lower().rstrip("/") for o in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                # The body was never read, so the connection cannot carry another request.
                await error_response(ForbiddenError(refusal, headers={"Connection": "close"})
                                     )(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> str | None:
        headers = {k: v for k, v in scope["headers"]
                   if k in (b"host", b"origin", b"sec-fetch-site")}
        # No Host at all (HTTP/1.0) is no browser's request: browsers always send one.
        host_value = headers.get(b"host", b"").decode("latin-1")
        host = split_host(host_value)
        if host_value and host is None:
            return f"Host {self._shown(host_value)} is not a host name with an optional port"
        if host is not None and not self._host_allowed(host[0], scope):
            return self._host_message(host_value)
        if scope["method"] in SAFE_METHODS:
            return None
        origin = headers.get(b"origin")
        if origin is None:
            if headers.get(b"sec-fetch-site") == b"cross-site":
                return (f"a cross-site {scope['method']} from a web page is refused (it sent "
                        "Sec-Fetch-Site: cross-site and no Origin); call this service from "
                        "the page's server instead, or from a site in CHARLSTM_CORS_ORIGINS")
            return None
        text = origin.decode("latin-1")
        if self._origin_allowed(text, host):
            return None
        return (f"a {scope['method']} from Origin {self._shown(text)} is refused: pages of "
                "another site may not use this service; to allow that site, add it to "
                "CHARLSTM_CORS_ORIGINS (e.g. https://app.example.com) or its host name to "
                "CHARLSTM_ALLOWED_HOSTS")

    def _host_allowed(self, name: str, scope: Scope) -> bool:
        if self.allowed.any or is_loopback(name) or self.allowed.named(name):
            return True
        if self.listed:
            return False
        # No list: only a service bound to loopback restricts the Host, and only for what came
        # in over loopback (under `uvicorn app.main:app --host 0.0.0.0` CHARLSTM_HOST still
        # says 127.0.0.1; the socket a request came in on says where it listens).
        server = scope.get("server")
        return not (self.loopback_bind and server is not None and is_loopback(str(server[0])))

    @staticmethod
    def _shown(value: str) -> str:
        return repr(value if len(value) <= 100 else value[:100] + "...")

    def _host_message(self, value: str) -> str:
        listed = " and the names in CHARLSTM_ALLOWED_HOSTS" if self.listed else ""
        return (f"Host {self._shown(value)} is refused: this server answers only to localhost names"
                f"{listed}, so that a web page cannot reach it under its own name (DNS "
                "rebinding); to reach it by this name, add the name to "
                "CHARLSTM_ALLOWED_HOSTS")

    def _origin_allowed(self, origin: str, host: tuple[str, int | None] | None) -> bool:
        if self.cors_any or origin.lower().rstrip("/") in self.cors:
            return True
        try:
            parts = urlsplit(origin)
            name, port = parts.hostname, parts.port
        except ValueError:
            return False
        if parts.scheme not in DEFAULT_PORTS or not name or parts.path not in ("", "/"):
            return False  # "null" (a sandboxed frame, a file: page) among others
        name = name.removesuffix(".")
        if host is not None and name == host[0]:
            # The same host and port as the request's Host: the page this service served.
            # The scheme is not compared: behind a TLS proxy the request may arrive as http.
            default = DEFAULT_PORTS[parts.scheme]
            if (port or default) == (host[1] or default):
                return True
        return self.allowed.named(name)
