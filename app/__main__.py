"""`python -m app` / `charlstm-serve`: uvicorn with a draining SIGTERM.

On SIGTERM (or Ctrl-C) the service stops admitting (new requests get 503, /ready turns 503),
running generations get up to CHARLSTM_DRAIN_S to finish, then uvicorn shuts down and the
process exits 0. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn

from app.artifact import ArtifactError
from app.connections import HttpLimits, LimitedConfig
from app.main import create_app
from app.service import ModelService
from app.settings import Settings

log = logging.getLogger("app")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, svc: ModelService, grace_s: float) -> None:
        super().__init__(config)
        self.svc = svc
        self.grace_s = grace_s
        self._draining: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is not None or not self.started:
            super().handle_exit(sig, frame)  # second signal, or not serving yet: stop now
            return
        log.info("signal %s: draining for up to %.0f s", signal.Signals(sig).name, self.grace_s)
        self._draining = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        clean = await self.svc.drain(self.grace_s)
        log.info("drain %s; shutting down", "complete" if clean else "timed out")
        self.should_exit = True


def main() -> int:
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    svc: ModelService = app.state.service
    try:
        svc.load()  # fail fast with a one-line reason, before uvicorn starts; lifespan reuses it
    except ArtifactError as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return 2
    config = LimitedConfig(app, host=settings.host, port=settings.port,
                           log_level=settings.log_level.lower(), proxy_headers=True,
                           timeout_graceful_shutdown=5,
                           # Longer than client pools (httpx 5 s) and load balancers (often
                           # 60 s) keep idle connections, so the server is never the side that
                           # closes one just as a request is sent on it.
                           timeout_keep_alive=75,
                           limit_concurrency=settings.max_connections,
                           http_limits=HttpLimits.from_settings(settings))
    server = DrainingServer(config, svc, settings.drain_s)
    print(f"serving {settings.models_dir}/ at http://{settings.host}:{settings.port}/ "
          f"(API docs at /docs)", flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
