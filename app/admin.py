"""POST /admin/reload: load new and changed model folders now (hot reload, app/reload.py).

Guarded by the API keys like /generate. Without keys it is refused (403) unless
CHARLSTM_ADMIN_LOCAL opts in to callers on this host: a reload starts processes and reads the
disk, which nobody on the network should trigger at will on a service left open for
generation. The peer address alone cannot say "on this host": a same-host proxy (a mesh
sidecar connects from 127.0.0.6; nginx's plain proxy_pass sets no X-Forwarded-For) makes
every remote caller look local. So one setting, CHARLSTM_TRUSTED_PROXIES, decides both which
peers' forwarded headers uvicorn believes (app/worker.py) and which peers are proxies here:
a local caller is a loopback peer that is not a trusted proxy and forwards nobody.

Replies name model folders relative to the models folder: callers never see server paths.
"""

from __future__ import annotations

import ipaddress

from fastapi import APIRouter, Depends, Request

from app.api import ERROR_RESPONSES, Svc
from app.auth import requires_key
from app.errors import ForbiddenError, NotSupportedError, UnavailableError
from app.manifest import ReloadReport, request_reload
from app.schemas import ErrorBody

router = APIRouter(dependencies=[Depends(requires_key)], responses={
    **ERROR_RESPONSES, 403: {"model": ErrorBody}, 501: {"model": ErrorBody}})

# Headers by which a proxy says whom it forwards (RFC 7239, and the common de-facto two).
FORWARDING = frozenset({"forwarded", "x-forwarded-for", "x-real-ip"})

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def peer_address(request: Request) -> Address | None:
    host = request.client.host if request.client else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_trusted_proxy(ip: Address, trusted: list[str]) -> bool:
    return any(entry == "*" or ip in ipaddress.ip_network(entry, strict=False)
               for entry in trusted)


def local_caller(request: Request, trusted: list[str]) -> bool:
    """A caller on this host: a loopback peer, not a trusted proxy (one that forwarded
    nobody is still a proxy), that sends no forwarding header (a proxy not trusted that
    forwards someone: whoever it is, it is not this host)."""
    ip = peer_address(request)
    if ip is None or not ip.is_loopback or is_trusted_proxy(ip, trusted):
        return False
    return not any(name in FORWARDING for name in request.headers)


@router.post(
    "/admin/reload", response_model=ReloadReport, tags=["ops"],
    summary="Load new and changed model folders now",
    description="Looks at every folder in the models folder: a new or changed one is loaded "
    "and warmed beside the version serving, then takes the new requests, while generations "
    "already running finish on the old one. Answers when every folder has been loaded or "
    "refused (refusals name the reason; the version serving keeps serving). Needs an API key "
    "when keys are configured; without keys, refused unless CHARLSTM_ADMIN_LOCAL accepts "
    "callers on this host (not through a proxy). Under "
    "`python -m app` only (501 under `uvicorn app.main:app`).",
)
async def reload_models(request: Request, svc: Svc) -> ReloadReport:
    settings = svc.settings
    if not settings.api_keys:
        if not settings.admin_local:
            raise ForbiddenError(
                "POST /admin/reload needs an API key: set CHARLSTM_API_KEYS, or "
                "CHARLSTM_ADMIN_LOCAL=true to accept it without one from this host")
        if not local_caller(request, settings.trusted_proxies):
            seen = request.client.host if request.client else "unknown"
            raise ForbiddenError(
                f"POST /admin/reload without an API key is accepted only from this host, not "
                f"through a proxy (caller seen as {seen}); set CHARLSTM_API_KEYS to call it "
                "remotely")
    if settings.engine_dir is None:
        raise NotSupportedError(
            "hot reload needs the process layout of `python -m app`; this server runs "
            "`uvicorn app.main:app` (engines on threads): restart it to load new models")
    # A round waits for every new engine to load and warm (each at most the start timeout,
    # in parallel), and for the round already running, if any.
    report = await request_reload(settings.engine_dir, 2 * settings.engine_start_timeout_s + 10)
    if report is None:
        raise UnavailableError("the supervisor did not answer the reload request in time; "
                               "see its log", retry_after=5)
    await svc.sync()  # this worker serves the new versions before it answers
    return report.without_paths(settings.models_dir, settings.engine_dir)
