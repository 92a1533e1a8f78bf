"""`--serve`: once a model is exported, have the service at a URL serve it.

A service answering there (`python -m app` on the same models folder) loads the new folder by
itself (hot reload, app/reload.py); this asks it to at once (POST /admin/reload, with
$CHARLSTM_API_KEY when keys are configured) and waits until /models names the version just
exported. With no service there, it starts one on the models folder (`python -m app`, in the
foreground, in place of this process, so training's memory is given back): only where the URL
names this host. A URL naming another host (Compose's `http://api-cpu:8000` from the train
container) is waited for instead, for WAIT_FOR_REMOTE_S: that service may still be starting,
and no service could listen on another host's address from here.

No TensorFlow here: only httpx and the artifact contract.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httpx

from app.artifact import read_metadata

DEFAULT_PORT = 8000
POLL_S = 0.5
WAIT_FOR_REMOTE_S = 60.0


class ServeError(Exception):
    """The model was exported but is not served; the message says why and what to do."""


def default_url() -> str:
    """$CHARLSTM_URL (the client's setting), else the address `python -m app` would bind."""
    url = os.environ.get("CHARLSTM_URL")
    if url:
        return url.rstrip("/")
    host = os.environ.get("CHARLSTM_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "::"):  # bound on every interface: reach it on this host
        host = "127.0.0.1"
    return f"http://{host}:{os.environ.get('CHARLSTM_PORT', DEFAULT_PORT)}"


def serve(model_dir: Path, url: str, timeout_s: float = 300.0,
          wait_s: float = WAIT_FOR_REMOTE_S) -> None:
    """Return once the service at `url` serves the model in `model_dir`. If nothing answers,
    start a service there (never returning) when `url` is on this host, else wait up to
    `wait_s` for one to answer."""
    if not is_up(url):
        if is_this_host(url):
            start_service(model_dir, url)
        wait_until_up(url, wait_s)
    created = read_metadata(model_dir).created
    key = os.environ.get("CHARLSTM_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    name = model_dir.name
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        print(f"a service answers at {url}: asking it to load {name}", flush=True)
        ask_reload(client, model_dir, timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = served_info(client, name)
            if info is not None and info.get("created") == created:
                print(f"serving {name} (version {info.get('version', 1)}) at {url}/\n"
                      f"try: curl -N {url}/generate -H 'Content-Type: application/json' -d "
                      f"'{{\"model\": \"{name}\", \"seed_text\": \"\", \"stream\": true}}'",
                      flush=True)
                return
            time.sleep(POLL_S)
    raise ServeError(f"the service at {url} did not start serving {name} within "
                     f"{timeout_s:.0f} s: does it serve {model_dir.parent} "
                     "(CHARLSTM_MODELS_DIR)? Its log names any folder it refused and why")


def is_up(url: str) -> bool:
    """True if charlstm answers at `url`, False if nothing does."""
    try:
        reply = httpx.get(f"{url}/health", timeout=5)
    except httpx.TransportError:
        return False
    if reply.status_code != 200 or _json(reply).get("status") != "ok":
        raise ServeError(f"{url} answers, but not as a charlstm service (GET /health: "
                         f"{reply.status_code}); pass another --url")
    return True


def is_this_host(url: str) -> bool:
    """True if the URL's host is an address of this machine (loopback, the wildcard, or one
    this machine can bind), where `python -m app` could listen."""
    host = urlsplit(url).hostname
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):  # an unknown name: a host not up yet, a typo
        return False
    for family, _, _, _, address in infos:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address[0], 0, *address[2:]))
            except OSError:  # not an address of this machine
                continue
            return True
    return False


def wait_until_up(url: str, wait_s: float) -> None:
    host = urlsplit(url).hostname
    print(f"nothing answers at {url} yet, and {host} is not this host: waiting up to "
          f"{wait_s:.0f} s for it", flush=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(min(POLL_S * 2, max(deadline - time.monotonic(), 0)))
        if is_up(url):
            return
    raise ServeError(f"nothing answered at {url} within {wait_s:.0f} s, and a service cannot "
                     f"be started here: {host} is not an address of this host. Start the "
                     "service first (with Compose: `docker compose up -d api`, or "
                     "`docker compose --profile cpu up -d api-cpu` with --url "
                     "http://api-cpu:8000), or pass the --url of a running one")


def ask_reload(client: httpx.Client, model_dir: Path, timeout_s: float) -> None:
    """POST /admin/reload and stop on an answer that says the model will not be served; on a
    refusal of the request itself (no key, not from this host), the watcher will do."""
    try:
        reply = client.post("/admin/reload", timeout=timeout_s)
    except httpx.TransportError as exc:
        raise ServeError(f"the reload request failed: {exc}") from None
    if reply.status_code == 200:
        for refusal in _json(reply).get("refused", []):
            # Folders are named relative to the service's models folder (never its paths).
            if Path(refusal.get("folder", "")).name == model_dir.name:
                raise ServeError(f"the service refused {model_dir}: {refusal.get('reason')}")
    elif reply.status_code == 501:
        raise ServeError(f"the service at {client.base_url} cannot load models while running "
                         f"(`uvicorn app.main:app`): restart it to serve {model_dir.name}, or "
                         "run `python -m app`")
    else:
        message = _json(reply).get("error", {}).get("message", reply.text[:200])
        print(f"(POST /admin/reload: {reply.status_code} {message}; waiting for the service "
              "to notice the new folder instead)", flush=True)


def served_info(client: httpx.Client, name: str) -> dict[str, Any] | None:
    reply = client.get(f"/models/{name}")
    if reply.status_code in (401, 403):
        raise ServeError(f"GET /models/{name} needs an API key: set CHARLSTM_API_KEY")
    return _json(reply) if reply.status_code == 200 else None


def start_service(model_dir: Path, url: str) -> NoReturn:
    """`python -m app` on the models folder, at the URL's host and port, replacing this
    process. The default model becomes this one if the configured default is not there."""
    from app.settings import Settings

    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ServeError(f"nothing answers at {url}, and a service can only be started at an "
                         "http://HOST:PORT address")
    models_dir = model_dir.parent
    env = {**os.environ, "CHARLSTM_MODELS_DIR": str(models_dir),
           "CHARLSTM_HOST": parts.hostname, "CHARLSTM_PORT": str(parts.port or 80)}
    default = env.get("CHARLSTM_DEFAULT_MODEL") or Settings.model_fields["default_model"].default
    if not (models_dir / str(default)).is_dir():
        env["CHARLSTM_DEFAULT_MODEL"] = model_dir.name
    print(f"nothing answers at {url}: starting the service on {models_dir}/ (python -m app; "
          f"default model {env.get('CHARLSTM_DEFAULT_MODEL', default)}; Ctrl-C stops it)",
          flush=True)
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "app"], env)


def _json(reply: httpx.Response) -> dict[str, Any]:
    try:
        body = reply.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
