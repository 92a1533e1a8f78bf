"""Sync and async clients: request bodies, retries on 429/503, replies as typed results."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Sequence,
)
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import httpx

from client._sse import GenerationEvents
from client.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    GenerationError,
    OverloadedError,
    UnavailableError,
    error_from_response,
)
from client.types import GenerationResult, ModelList

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "CHARLSTM_URL"
API_KEY_ENV = "CHARLSTM_API_KEY"
# Reads may wait for a whole non-streamed generation: above the server's default 120 s limit.
DEFAULT_TIMEOUT = httpx.Timeout(130.0, connect=5.0)
DEFAULT_MAX_RETRIES = 2
BACKOFF_S = 0.5  # first retry's wait without a Retry-After header; doubles with each retry
MAX_RETRY_WAIT_S = 30.0  # a server asking for longer gets the error raised instead
USER_AGENT = "charlstm-client/0.1"


def retry_delay(attempt: int, retry_after: float | None, jitter: float) -> float | None:
    """Seconds to wait before retry number `attempt` (0-based), or None to give up.

    Exponential backoff, never shorter than the server's Retry-After; `jitter` in [0, 1)
    stretches the wait by up to a quarter so that clients refused together come back apart.
    """
    if retry_after is not None and retry_after > MAX_RETRY_WAIT_S:
        return None
    backoff = min(BACKOFF_S * 2.0**attempt, MAX_RETRY_WAIT_S)
    return max(backoff, retry_after or 0.0) * (1 + 0.25 * jitter)


def generation_body(seed_text: str, *, model: str | None, temperature: float | None,
                    max_new_chars: int | None, top_k: int | None, top_p: float | None,
                    seed: int | None, stop: str | Sequence[str] | None, details: bool,
                    time_limit_s: float | None, stream: bool,
                    resumable: bool = False) -> dict[str, Any]:
    """The JSON body of POST /generate. Parameters left as None are omitted, so the server's
    defaults apply (temperature 1, top_k and top_p off, max_new_chars from its settings)."""
    body: dict[str, Any] = {"seed_text": seed_text, "stream": stream}
    optional: dict[str, Any] = {
        "model": model, "temperature": temperature, "max_new_chars": max_new_chars,
        "top_k": top_k, "top_p": top_p, "seed": seed, "time_limit_s": time_limit_s,
        "stop": stop if stop is None or isinstance(stop, str) else list(stop),
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if details:
        body["details"] = True
    if resumable:
        body["resumable"] = True
    return body


def continuation_body(continuation: str, *, max_new_chars: int | None,
                      stop: str | Sequence[str] | None, details: bool,
                      time_limit_s: float | None, stream: bool, resumable: bool
                      ) -> dict[str, Any]:
    """POST /generate going on from a handle: the handle carries the seed and sampling."""
    body = generation_body("", model=None, temperature=None, max_new_chars=max_new_chars,
                           top_k=None, top_p=None, seed=None, stop=stop, details=details,
                           time_limit_s=time_limit_s, stream=stream, resumable=resumable)
    del body["seed_text"]
    body["continuation"] = continuation
    return body


def raise_for_generation_error(result: GenerationResult) -> GenerationResult:
    if result.error is not None:
        raise GenerationError("generation_error", result.error, result)
    return result


@contextmanager
def transport_errors(url: str) -> Iterator[None]:
    """httpx's network errors as this package's, naming the server."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(f"timed out talking to {url} ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise APIConnectionError(f"cannot talk to {url}: {str(exc) or type(exc).__name__}") from exc


def json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise APIError(response.status_code, "invalid_response",
                       f"expected a JSON object, got: {response.text[:200]!r}")
    return body


class _Settings:
    """What both clients share: where to call, with which key, and when to retry."""

    def __init__(self, base_url: str | None, api_key: str | None, max_retries: int) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.base_url = (base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.headers = {"User-Agent": USER_AGENT}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.max_retries = max_retries

    def retry_delay(self, attempt: int, error: APIError) -> float | None:
        if attempt >= self.max_retries or not isinstance(error, OverloadedError | UnavailableError):
            return None
        return retry_delay(attempt, error.retry_after, random.random())


def _request_headers(stream: bool) -> dict[str, str]:
    return {"Accept": "text/event-stream" if stream else "application/json"}


class Stream(Iterator[str]):
    """The text chunks of one streamed generation, in order, then `result`: the summary.

    The request goes out on the first `next()`. A 429 or 503 is retried before any text is
    yielded, never after. Leaving early (`close()`, or a `with` block) closes the connection,
    which cancels the generation on the server.
    """

    def __init__(self, open_response: Callable[[], httpx.Response], url: str) -> None:
        self._open = open_response
        self._url = url
        self._result: GenerationResult | None = None
        self._chunks = self._read()

    def _read(self) -> Generator[str, None, None]:
        response = self._open()
        events = GenerationEvents()
        try:
            with transport_errors(self._url):
                for data in response.iter_bytes():
                    yield from events.feed_bytes(data)
        finally:
            response.close()
        self._result = events.result
        events.finish()

    def __next__(self) -> str:
        return next(self._chunks)

    @property
    def result(self) -> GenerationResult:
        """The `done` summary: text, finish_reason, seed, usage, timings (details if asked)."""
        if self._result is None:
            raise RuntimeError("the stream has not finished: read it to the end first")
        return self._result

    def close(self) -> None:
        self._chunks.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncStream(AsyncIterator[str]):
    """`Stream` for asyncio: `async for chunk in stream`, then `stream.result`."""

    def __init__(self, open_response: Callable[[], Awaitable[httpx.Response]], url: str) -> None:
        self._open = open_response
        self._url = url
        self._result: GenerationResult | None = None
        self._chunks = self._read()

    async def _read(self) -> AsyncGenerator[str, None]:
        response = await self._open()
        events = GenerationEvents()
        try:
            with transport_errors(self._url):
                async for data in response.aiter_bytes():
                    for text in events.feed_bytes(data):
                        yield text
        finally:
            await response.aclose()
        self._result = events.result
        events.finish()

    async def __anext__(self) -> str:
        return await anext(self._chunks)

    @property
    def result(self) -> GenerationResult:
        """The `done` summary: text, finish_reason, seed, usage, timings (details if asked)."""
        if self._result is None:
            raise RuntimeError("the stream has not finished: read it to the end first")
        return self._result

    async def aclose(self) -> None:
        await self._chunks.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class Client:
    """A blocking client for the charlstm service.

    base_url defaults to $CHARLSTM_URL, then http://127.0.0.1:8000; api_key to
    $CHARLSTM_API_KEY. 429 and 503 replies are retried up to `max_retries` times with
    exponential backoff that honours Retry-After. `timeout` is in seconds (or an httpx.Timeout).
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 max_retries: int = DEFAULT_MAX_RETRIES,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._settings = _Settings(base_url, api_key, max_retries)
        self._http = httpx.Client(base_url=self._settings.base_url, timeout=timeout,
                                  headers=self._settings.headers, transport=transport)

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    def generate(self, seed_text: str, *, model: str | None = None,
                 temperature: float | None = None, max_new_chars: int | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, details: bool = False,
                 time_limit_s: float | None = None, resumable: bool = False
                 ) -> GenerationResult:
        """Continue `seed_text` and return the whole reply (with resumable=True, a
        `continuation` handle for `resume`).

        Raises GenerationError (with `.result`, the text so far) if generation failed part-way.
        """
        body = generation_body(
            seed_text, model=model, temperature=temperature, max_new_chars=max_new_chars,
            top_k=top_k, top_p=top_p, seed=seed, stop=stop, details=details,
            time_limit_s=time_limit_s, stream=False, resumable=resumable)
        result = GenerationResult.from_json(json_object(self._request("POST", "/generate", body)))
        return raise_for_generation_error(result)

    def resume(self, continuation: str, *, max_new_chars: int | None = None,
               stop: str | Sequence[str] | None = None, details: bool = False,
               time_limit_s: float | None = None, resumable: bool = False
               ) -> GenerationResult:
        """Go on from a `continuation` handle: the text one longer request would have given."""
        body = continuation_body(continuation, max_new_chars=max_new_chars, stop=stop,
                                 details=details, time_limit_s=time_limit_s, stream=False,
                                 resumable=resumable)
        result = GenerationResult.from_json(json_object(self._request("POST", "/generate", body)))
        return raise_for_generation_error(result)

    def stream(self, seed_text: str, *, model: str | None = None,
               temperature: float | None = None, max_new_chars: int | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop: str | Sequence[str] | None = None, details: bool = False,
               time_limit_s: float | None = None) -> Stream:
        """Continue `seed_text`, yielding text as it is generated; see `Stream`."""
        body = generation_body(
            seed_text, model=model, temperature=temperature, max_new_chars=max_new_chars,
            top_k=top_k, top_p=top_p, seed=seed, stop=stop, details=details,
            time_limit_s=time_limit_s, stream=True)
        return Stream(lambda: self._request("POST", "/generate", body, stream=True),
                      self.base_url)

    def models(self) -> ModelList:
        return ModelList.from_json(json_object(self._request("GET", "/models")))

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                 stream: bool = False) -> httpx.Response:
        """The first successful reply (its body unread when streaming), else a typed error."""
        for attempt in range(self._settings.max_retries + 1):
            with transport_errors(self.base_url):
                request = self._http.build_request(method, path, json=body,
                                                   headers=_request_headers(stream))
                response = self._http.send(request, stream=stream)
                if response.is_success:
                    return response
                response.read()
                response.close()
            error = error_from_response(response)
            delay = self._settings.retry_delay(attempt, error)
            if delay is None:
                raise error
            time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncClient:
    """`Client` for asyncio: the same options, methods to await, `stream` to `async for`."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 max_retries: int = DEFAULT_MAX_RETRIES,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._settings = _Settings(base_url, api_key, max_retries)
        self._http = httpx.AsyncClient(base_url=self._settings.base_url, timeout=timeout,
                                       headers=self._settings.headers, transport=transport)

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    async def generate(self, seed_text: str, *, model: str | None = None,
                       temperature: float | None = None, max_new_chars: int | None = None,
                       top_k: int | None = None, top_p: float | None = None,
                       seed: int | None = None, stop: str | Sequence[str] | None = None,
                       details: bool = False, time_limit_s: float | None = None,
                       resumable: bool = False) -> GenerationResult:
        """Continue `seed_text` and return the whole reply; see `Client.generate`."""
        body = generation_body(
            seed_text, model=model, temperature=temperature, max_new_chars=max_new_chars,
            top_k=top_k, top_p=top_p, seed=seed, stop=stop, details=details,
            time_limit_s=time_limit_s, stream=False, resumable=resumable)
        response = await self._request("POST", "/generate", body)
        return raise_for_generation_error(GenerationResult.from_json(json_object(response)))

    async def resume(self, continuation: str, *, max_new_chars: int | None = None,
                     stop: str | Sequence[str] | None = None, details: bool = False,
                     time_limit_s: float | None = None, resumable: bool = False
                     ) -> GenerationResult:
        """Go on from a `continuation` handle; see `Client.resume`."""
        body = continuation_body(continuation, max_new_chars=max_new_chars, stop=stop,
                                 details=details, time_limit_s=time_limit_s, stream=False,
                                 resumable=resumable)
        response = await self._request("POST", "/generate", body)
        return raise_for_generation_error(GenerationResult.from_json(json_object(response)))

    def stream(self, seed_text: str, *, model: str | None = None,
               temperature: float | None = None, max_new_chars: int | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop: str | Sequence[str] | None = None, details: bool = False,
               time_limit_s: float | None = None) -> AsyncStream:
        """Continue `seed_text`, yielding text as it is generated; see `Stream`."""
        body = generation_body(
            seed_text, model=model, temperature=temperature, max_new_chars=max_new_chars,
            top_k=top_k, top_p=top_p, seed=seed, stop=stop, details=details,
            time_limit_s=time_limit_s, stream=True)
        return AsyncStream(lambda: self._request("POST", "/generate", body, stream=True),
                           self.base_url)

    async def models(self) -> ModelList:
        return ModelList.from_json(json_object(await self._request("GET", "/models")))

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                       stream: bool = False) -> httpx.Response:
        """The first successful reply (its body unread when streaming), else a typed error."""
        for attempt in range(self._settings.max_retries + 1):
            with transport_errors(self.base_url):
                request = self._http.build_request(method, path, json=body,
                                                   headers=_request_headers(stream))
                response = await self._http.send(request, stream=stream)
                if response.is_success:
                    return response
                await response.aread()
                await response.aclose()
            error = error_from_response(response)
            delay = self._settings.retry_delay(attempt, error)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
