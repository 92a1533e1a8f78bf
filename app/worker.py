"""An HTTP worker process: uvicorn serving the app on a socket the supervisor shares.

SIGTERM drains: the worker stops admitting (503, /ready 503), gives its running requests
CHARLSTM_DRAIN_S, ends the rest with an error event and `done`, then uvicorn shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.connections import HttpLimits, LimitedConfig
from app.lifecycle import die_with_parent
from app.main import create_app
from app.service import ModelService
from app.settings import Settings

log = logging.getLogger("app")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, svc: ModelService, grace_s: float,
                 supervised: bool = False) -> None:
        super().__init__(config)
        self.svc = svc
        self.grace_s = grace_s
        # Under the supervisor, Ctrl-C reaches every process of the group; the supervisor
        # turns it into one SIGTERM per worker, so the worker's own SIGINT is ignored (two
        # signals would skip the drain).
        self.supervised = supervised
        self._draining: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.supervised and sig == signal.SIGINT:
            return
        if self._draining is not None or not self.started:
            # Second signal, or not serving yet: stop now, without waiting out start-up.
            self.svc.stop_starting.set()
            super().handle_exit(sig, frame)
            return
        log.info("signal %s: draining for up to %.0f s", signal.Signals(sig).name, self.grace_s)
        self._draining = asyncio.get_event_loop().create_task(self._drain())

    async def _drain(self) -> None:
        clean = await self.svc.drain(self.grace_s)
        log.info("drain %s; shutting down", "complete" if clean else "timed out")
        self.should_exit = True


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    # One trust list for the forwarded headers and for what POST /admin/reload calls local
    # (app/admin.py): uvicorn's default would believe 127.0.0.1 and ::1, so a same-host proxy
    # sending no X-Forwarded-For made every remote caller local.
    return LimitedConfig(app, host=settings.host, port=settings.port,
                         log_level=settings.log_level.lower(),
                         proxy_headers=bool(settings.trusted_proxies),
                         forwarded_allow_ips=settings.trusted_proxies or [],
                         timeout_graceful_shutdown=5,
                         # Longer than client pools (httpx 5 s) and load balancers (often
                         # 60 s) keep idle connections, so the server is never the side that
                         # closes one just as a request is sent on it.
                         timeout_keep_alive=75,
                         # Per worker process: CHARLSTM_HTTP_WORKERS x this in all.
                         limit_concurrency=settings.max_connections,
                         http_limits=HttpLimits.from_settings(settings))


def main(settings: Settings, sock: socket.socket, engine_dir: Path) -> None:
    """Entry point of a worker process started by app.supervisor."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    die_with_parent()
    # A terminal's hangup reaches the whole process group; to the supervisor it means reload.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = settings.model_copy(update={"engine_dir": engine_dir})
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), app.state.service,
                            settings.drain_s, supervised=True)
    server.run(sockets=[sock])
