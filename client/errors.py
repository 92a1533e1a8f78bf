"""Everything the client raises, under one base, and the mapping from an HTTP reply to a class.

    CharlstmError
    ├── APIConnectionError          the server could not be reached, or the reply broke off
    │   └── APITimeoutError
    └── APIError                    the server answered with an error: status, type, message
        ├── InvalidRequestError     400, 422
        ├── AuthenticationError     401
        ├── NotFoundError           404
        ├── PayloadTooLargeError    413
        ├── OverloadedError         429 (retry_after)
        ├── ServerError             other 5xx
        │   └── UnavailableError    503 (retry_after)
        └── GenerationError         a stream reported `event: error` (result: the partial reply)
"""

from __future__ import annotations

import email.utils
import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from client.types import GenerationResult


class CharlstmError(Exception):
    """Base of every error this package raises."""


class APIConnectionError(CharlstmError):
    """The server could not be reached, or the connection broke before the reply was complete."""


class APITimeoutError(APIConnectionError):
    """The server took longer than the client's timeout to connect or to send more bytes."""


class APIError(CharlstmError):
    """An error reply: `{"error": {"type", "message"}}` with an HTTP status.

    `retry_after` holds the seconds of a Retry-After header, when the server sent one.
    """

    def __init__(self, status: int, error_type: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{message} ({error_type}, HTTP {status})")
        self.status = status
        self.type = error_type
        self.message = message
        self.retry_after = retry_after


class InvalidRequestError(APIError):
    """422: a parameter is out of range, or the seed has characters the model does not know."""


class AuthenticationError(APIError):
    """401: the server wants an API key (api_key= or CHARLSTM_API_KEY) and got none or a wrong
    one."""


class NotFoundError(APIError):
    """404: no such model (or path)."""


class PayloadTooLargeError(APIError):
    """413: the request body is larger than the server accepts."""


class OverloadedError(APIError):
    """429: every row and queue slot of the model is taken; retry after `retry_after` s."""


class ServerError(APIError):
    """5xx: the server failed."""


class UnavailableError(ServerError):
    """503: the server is starting or draining; retry after `retry_after` s."""


class GenerationError(APIError):
    """A stream reported `event: error`: generation stopped part-way.

    `result` is the summary the server sent after the error (the text up to the failure), or
    None when the stream ended without one.
    """

    def __init__(self, error_type: str, message: str,
                 result: GenerationResult | None = None) -> None:
        super().__init__(200, error_type, message)
        self.result = result


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequestError, 401: AuthenticationError, 404: NotFoundError,
    413: PayloadTooLargeError, 422: InvalidRequestError, 429: OverloadedError,
    503: UnavailableError,
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def error_from_response(response: httpx.Response) -> APIError:
    """The typed error for an error reply whose body has been read.

    Bodies not in the service's error shape (a proxy's HTML page) keep the status and a short
    excerpt of the text.
    """
    status = response.status_code
    error_type, message = "http_error", (response.text.strip()[:200] or response.reason_phrase)
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error_type = str(body["error"].get("type", error_type))
        message = str(body["error"].get("message", message))
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    return cls(status, error_type, message, parse_retry_after(response.headers.get("retry-after")))
