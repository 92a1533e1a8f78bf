"""POST /admin/reload: load new and changed model folders now (hot reload, app/reload.py).

Guarded by the API keys like /generate. With no keys configured it is accepted only from the
loopback interface: a reload starts processes and reads the disk, which nobody on the network
should trigger at will on a service left open for generation. Behind a reverse proxy on the
same host the client address is the one in X-Forwarded-For (uvicorn trusts it from 127.0.0.1
only), so remote callers stay remote.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from app.api import ERROR_RESPONSES, Svc
from app.auth import requires_key
from app.errors import ForbiddenError, NotSupportedError, UnavailableError
from app.manifest import ReloadReport, request_reload
from app.origin import is_loopback
from app.schemas import ErrorBody

router = APIRouter(dependencies=[Depends(requires_key)], responses={
    **ERROR_RESPONSES, 403: {"model": ErrorBody}, 501: {"model": ErrorBody}})



def from_loopback(request: Request) -> bool:
    return is_loopback(request.client.host if request.client else "")


@router.post(
    "/admin/reload", response_model=ReloadReport, tags=["ops"],
    summary="Load new and changed model folders now",
    description="Looks at every folder in the models folder: a new or changed one is loaded "
    "and warmed beside the version serving, then takes the new requests, while generations "
    "already running finish on the old one. Answers when every folder has been loaded or "
    "refused (refusals name the reason; the version serving keeps serving). Needs an API key "
    "when keys are configured; without keys, accepted from this host only. Under "
    "`python -m app` only (501 under `uvicorn app.main:app`).",
)
async def reload_models(request: Request, svc: Svc) -> ReloadReport:
    settings = svc.settings
    if not settings.api_keys and not from_loopback(request):
        raise ForbiddenError("POST /admin/reload is accepted from this host only when no API "
                             "keys are configured (set CHARLSTM_API_KEYS to call it remotely)")
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
    return report
