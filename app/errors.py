"""Domain errors and the one place that maps them to HTTP: {"error": {"type", "message"}}."""

from __future__ import annotations

import logging
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    status = 500
    type = "internal_error"
    # Refusals a caller should retry (429, 503) say when: Retry-After, built here only.
    retry_after: int | None = None

    def __init__(self, message: str, headers: dict[str, str] | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.retry_after = retry_after
        if self.retry_after is not None:
            self.headers["Retry-After"] = str(self.retry_after)


class InvalidRequestError(ServiceError):
    status, type = 422, "invalid_request"


class ModelNotFoundError(ServiceError):
    status, type = 404, "model_not_found"


class OverloadedError(ServiceError):
    status, type, retry_after = 429, "overloaded", 1


class UnavailableError(ServiceError):
    status, type, retry_after = 503, "unavailable", 1


class UnauthorizedError(ServiceError):
    status, type = 401, "unauthorized"


class ForbiddenError(ServiceError):
    status, type = 403, "forbidden"


class NotSupportedError(ServiceError):
    status, type = 501, "not_supported"


class NoChatTemplateError(ServiceError):
    """A chat route on a service of plain-text character models."""

    status, type = 404, "no_chat_template"


class PayloadTooLargeError(ServiceError):
    status, type = 413, "payload_too_large"


class RequestTimeoutError(ServiceError):
    status, type = 408, "request_timeout"


class HeadersTooLargeError(ServiceError):
    status, type = 431, "headers_too_large"


FASTAPI_BODY_ERROR = "There was an error parsing the body"


class ClientGoneError(Exception):
    """The client disconnected before its reply was ready; nobody is left to answer."""


def error_body(type_: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message}}


def error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(error_body(exc.type, exc.message), status_code=exc.status,
                        headers=exc.headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        msg = str(err.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            parts.append(f"request body is not valid JSON: {ctx.get('error', msg)}")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {field!r}: this route does not take it (the README's "
                         "table of fields lists what each route does)")
        elif err.get("type") == "model_attributes_type":
            parts.append("request body must be a JSON object")
        elif msg.startswith(field):
            parts.append(msg)
        else:
            parts.append(f"{field}: {msg}")
    return "; ".join(parts) or "invalid request"


def _unreadable_body(cause: BaseException | None) -> str:
    if isinstance(cause, RecursionError):
        return "request body nests arrays or objects too deeply"
    if type(cause) is ValueError:
        # Python refuses to read integers longer than this (CVE-2020-10735); no field takes one.
        return (f"request body holds a number with more than {sys.get_int_max_str_digits()} "
                "digits; no field accepts a number that large")
    return "request body is not valid JSON in UTF-8"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", _describe_validation(exc)),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_ERROR:
            # FastAPI's body reader fails this way on what json.loads raises beside
            # JSONDecodeError; the cause says which.
            return JSONResponse(error_body("invalid_request", _unreadable_body(exc.__cause__)),
                                status_code=422)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(kind, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGoneError)
    async def _gone(_: Request, exc: ClientGoneError) -> Response:
        # 499 (nginx's "client closed request") shows up in access logs; no body is read.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Log the trace for operators; callers get no internals (paths, stack frames).
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", "internal server error"),
                            status_code=500)
