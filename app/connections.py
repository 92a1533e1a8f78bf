"""What one HTTP connection may cost before a request reaches the app.

uvicorn picks its httptools protocol when httptools is installed (uvicorn[standard] installs
it), and that protocol sets no limit on the size or number of request headers and no timeout
for reading them or a body: one connection streaming an endless header held the event loop for
seconds (httptools grows a header value by concatenation), a connection that sent nothing, or
a body shorter than its Content-Length, stayed open indefinitely. uvicorn's h11 protocol bounds
the header block (`h11_max_incomplete_event_size`, refused with a bare 400) but has neither a
header count nor read timeouts, and parses in pure Python. So the limits uvicorn has no argument
for are added here, in a small subclass of its httptools protocol that `LimitedConfig` selects:

- the header block (request line and headers) may hold `max_header_bytes`: 431, then close;
  the parser is never fed more than that (a pipelined request that starts inside one socket
  read is counted from the next read);
- at most `max_headers` header fields: 431;
- the header block must be complete `header_timeout_s` after the connection opens, or after the
  first byte of a later request on it (idle keep-alive connections are uvicorn's
  `timeout_keep_alive`): 408, then close;
- a body may pause at most `body_timeout_s` between reads: 408 if no reply has started, close.

uvicorn's own arguments carry the rest: `limit_concurrency` (503 past it), `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, cast

import uvicorn
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from app.errors import (
    HeadersTooLargeError,
    RequestTimeoutError,
    ServiceError,
    error_body,
    error_response,
)
from app.settings import Settings


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    body_timeout_s: float

    @classmethod
    def from_settings(cls, s: Settings) -> HttpLimits:
        return cls(s.max_header_bytes, s.max_headers, s.header_timeout_s, s.body_timeout_s)


class LimitedConfig(uvicorn.Config):
    """uvicorn.Config with the limits above. They travel inside the config, so worker processes
    that uvicorn starts with a pickled copy of it get them too."""

    def __init__(self, app: Any, *, http_limits: HttpLimits, **kwargs: Any) -> None:
        # No WebSocket routes here, and an upgraded connection would leave these limits behind.
        super().__init__(app, http=LimitedHttpToolsProtocol, ws="none", **kwargs)
        self.http_limits = http_limits


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, config: uvicorn.Config, server_state: ServerState,
                 app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None
                 ) -> None:
        if not isinstance(config, LimitedConfig):
            raise TypeError("LimitedHttpToolsProtocol takes its limits from a LimitedConfig")
        super().__init__(config, server_state, app_state, _loop)
        self.limits = config.http_limits
        self.head_bytes: int | None = 0  # of the header block being read; None during a body
        self.heads = 0  # header blocks completed on this connection
        self.head_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None

    # --- connection -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.head_bytes is None:
            super().data_received(data)
            return
        room = self.limits.max_header_bytes - self.head_bytes
        heads = self.heads
        super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if self.heads != heads:  # the block ended within `room`: the rest is body or next request
            if len(data) > room:
                self.data_received(data[room:])
            return
        if len(data) > room:
            self._refuse(HeadersTooLargeError(
                f"request header block is larger than {self.limits.max_header_bytes} bytes"))
        else:
            self.head_bytes += len(data)

    # --- parser callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.head_timer is None:  # a later request on a kept-alive connection
            self.head_timer = self.loop.call_later(self.limits.header_timeout_s,
                                                   self._head_late)

    def on_headers_complete(self) -> None:
        self.heads += 1
        self.head_bytes = None
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if len(self.headers) <= self.limits.max_headers:
            super().on_headers_complete()
        else:
            # Answer through uvicorn's own request cycle, as it answers limit_concurrency.
            refusal = error_response(HeadersTooLargeError(
                f"request has more than {self.limits.max_headers} header fields",
                headers={"Connection": "close"}))
            app, self.app = self.app, cast(ASGI3Application, refusal)
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        self._wait_for_body()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._wait_for_body()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        self.head_bytes = 0

    # --- timeouts and refusals --------------------------------------------------------------
    def _wait_for_body(self) -> None:
        if self.body_timer is not None:
            self.body_timer.cancel()
        self.body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_late)

    def _head_late(self) -> None:
        self.head_timer = None
        self._refuse(RequestTimeoutError(
            f"request header not complete within {self.limits.header_timeout_s:g} s"))

    def _body_late(self) -> None:
        self.body_timer = None
        if self.flow.read_paused:  # the app has not read what came: not the client's delay
            self._wait_for_body()
            return
        self._refuse(RequestTimeoutError(
            f"request body stalled for {self.limits.body_timeout_s:g} s"))

    def _refuse(self, exc: ServiceError) -> None:
        """Answer (unless a reply is under way, which this would corrupt) and close."""
        if self.transport.is_closing():
            return
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        self.logger.info("%s - closing: %s", peer, exc.message)
        cycle = self.cycle
        if cycle is None or not cycle.response_started or cycle.response_complete:
            body = json.dumps(error_body(exc.type, exc.message), separators=(",", ":")).encode()
            head = [STATUS_LINE[exc.status]]
            head += [name + b": " + value + b"\r\n"
                     for name, value in self.server_state.default_headers]
            head += [b"content-type: application/json\r\n",
                     b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
        self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self.head_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.body_timer = None
