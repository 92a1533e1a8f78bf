"""API keys, checked before anything reads the request body.

A route dependency runs only after FastAPI has read and parsed the body, so a caller without a
key would learn from a 413 or a 422 what the service accepts, and could make it read up to the
body limit. `ApiKeyMiddleware` answers 401 from the headers alone, for exactly the routes that
carry the `requires_key` dependency.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Annotated

from fastapi import Header, Request
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import UnauthorizedError, error_response
from app.tenants import scope_of

AuthorizationHeader = Annotated[str | None, Header(
    description="Bearer <key>: one of CHARLSTM_API_KEYS, when keys are configured")]


async def requires_key(authorization: AuthorizationHeader = None) -> None:
    """Marks a router's routes as needing a key, and documents the header in OpenAPI as
    optional (an OpenAPI security requirement would say always required, which is false when
    no keys are configured). It checks nothing: ApiKeyMiddleware has answered before it runs."""


UNAUTHORIZED = "missing or invalid API key (send Authorization: Bearer <key>)"


def guarded_routes(routes: Sequence[BaseRoute]) -> list[APIRoute]:
    """The routes declared with the `requires_key` dependency (on the route or its router).
    Pass the routers' own routes: an app's `routes` may hold included routers, not routes."""
    return [r for r in routes if isinstance(r, APIRoute)
            and any(d.dependency is requires_key for d in r.dependencies)]


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: Sequence[str], routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.routes = guarded_routes(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and self.keys and self._guarded(scope)
                and not self._authorized(scope)):
            # The body was never read, so the connection cannot carry another request.
            refusal = UnauthorizedError(UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer",
                                                               "Connection": "close"})
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _guarded(self, scope: Scope) -> bool:
        # FULL only: a guarded path with another method is a 405, with or without a key.
        return any(route.matches(scope)[0] is Match.FULL for route in self.routes)

    def _authorized(self, scope: Scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        presented = token.strip() if scheme.lower() == b"bearer" else b""
        # Compare against every key, always, so timing says nothing about which part was wrong.
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(presented, key)
        return ok


def tenant(request: Request) -> bytes:
    """Who is asking, for what must not be shared between callers (the state cache): a digest
    of the bearer key when keys are configured (the middleware has checked it), else b""
    (every caller is one tenant)."""
    if not request.app.state.settings.api_keys:
        return b""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    presented = token.strip() if scheme.lower() == "bearer" else ""
    # The engine knows each key's name, weight and budget by this same digest
    # (app/tenants.py tenant_table), and schedules fairly between them.
    return scope_of(presented)
