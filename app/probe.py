"""`python -m app.probe [PATH]`: exit 0 if the service on this host answers PATH (default
/health) with 200, else 1 with the reason on stderr. The images' HEALTHCHECK and the Compose
health checks run it, so the check follows CHARLSTM_HOST and CHARLSTM_PORT wherever they are
set (an image's ENV, `-e`, Compose) instead of repeating the port.

Standard library only, and nothing from the service itself: it runs every few seconds beside
the service and should start in tens of milliseconds.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_PORT = "8000"  # app/settings.py's default, read here without importing pydantic
TIMEOUT_S = 3.0
# Bound on every interface: reach it on loopback.
LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def probe_url(path: str = "/health") -> str:
    host = os.environ.get("CHARLSTM_HOST", "127.0.0.1").strip()
    host = LOOPBACK.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    port = os.environ.get("CHARLSTM_PORT", DEFAULT_PORT).strip() or DEFAULT_PORT
    return f"http://{host}:{port}{path}"


def probe(url: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """None if `url` answers 200, else why not."""
    # Never through $http_proxy: the service is on this host, a proxy would probe itself.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as reply:
            status = int(reply.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:  # refused, timed out, a malformed address
        return f"{url}: {exc}"
    return None if status == 200 else f"{url}: HTTP {status}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "/health"
    reason = probe(probe_url(path if path.startswith("/") else f"/{path}"))
    if reason is not None:
        print(f"unhealthy: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
