"""A request's events as an HTTP reply: one stream lifecycle for every route, formats apart.

`/generate` and `/v1/completions` read the same events (app/service.py `ModelService.open`)
and differ only in how they write them: a `StreamFormat` turns characters, errors and the
summary into server-sent events; a JSON reply consumes the same events first. The lifecycle is
written once: events end on grapheme-cluster boundaries, keep-alive comments while idle, a
stream that fails says so before it ends, it always ends with its format's terminal events,
the drain waits for it, and a client that goes away cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from fastapi.sse import KEEPALIVE_COMMENT

from app.engine.messages import Detail, Event
from app.errors import ClientGoneError
from app.graphemes import ClusterBuffer, can_join
from app.schemas import GenerateResponse
from app.service import Job, ModelService, Reply
from app.sse_text import sse_event
from app.vocab import Vocabulary

T = TypeVar("T")


def data_event(payload: Any) -> bytes:
    """One `data:` event: one line of JSON every reader splits alike (app/sse_text.py)."""
    return sse_event(payload)


def named_event(name: str, payload: Any) -> bytes:
    return sse_event(payload, name)


@functools.lru_cache(maxsize=64)
def vocab_can_join(vocab: Vocabulary) -> bool:
    return can_join(vocab.chars)


class Holdback:
    """Characters and their details held until their grapheme cluster is complete, so no
    event begins or ends inside what a reader sees as one character (a combining mark, a
    ZWJ sequence, a flag, CRLF). A vocabulary entry is one code point, so the ids held are
    the code points held."""

    def __init__(self, reply: Reply) -> None:
        self.vocab = reply.job.served.model.vocab
        self.clusters = ClusterBuffer()
        # A vocabulary with no code point that joins another (the bundled models': ASCII
        # with LF) breaks clusters everywhere: nothing is held, no event waits for its next.
        self.passthrough = not vocab_can_join(self.vocab)
        self.ids: list[int] = []
        self.details: list[Detail] | None = None

    def push(self, ids: list[int], details: list[Detail] | None
             ) -> tuple[list[int], list[Detail] | None]:
        if self.passthrough:
            return ids, details
        self.ids += ids
        if details is not None:
            self.details = (self.details or []) + details
        return self._take(len(self.clusters.push(self.vocab.decode(ids))))

    def flush(self) -> tuple[list[int], list[Detail] | None]:
        return self._take(len(self.clusters.flush()))

    def _take(self, n: int) -> tuple[list[int], list[Detail] | None]:
        ids, self.ids = self.ids[:n], self.ids[n:]
        details = None
        if self.details is not None:
            details, self.details = self.details[:n], self.details[n:]
        return ids, details


class StreamFormat(Protocol):
    def start(self) -> list[bytes]: ...
    def chars(self, reply: Reply, ids: list[int], details: list[Detail] | None) -> bytes: ...
    def error(self, type_: str, message: str) -> bytes: ...
    def end(self, summary: GenerateResponse) -> list[bytes]: ...


class NativeFormat:
    """`/generate`: `data: {"text", "details"?}` per chunk, `event: error` if one happened,
    `event: done` with the same summary as the JSON reply."""

    def start(self) -> list[bytes]:
        return []

    def chars(self, reply: Reply, ids: list[int], details: list[Detail] | None) -> bytes:
        chunk: dict[str, Any] = {"text": reply.job.served.model.vocab.decode(ids)}
        if details is not None:
            chunk["details"] = [d.model_dump() for d in reply.char_details(ids, details)]
        return data_event(chunk)

    def error(self, type_: str, message: str) -> bytes:
        return named_event("error", {"error": {"type": type_, "message": message}})

    def end(self, summary: GenerateResponse) -> list[bytes]:
        return [named_event("done", summary.model_dump(mode="json", exclude_none=True))]


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_response(svc: ModelService, job: Job, events: AsyncGenerator[Event | None, None],
                 fmt: StreamFormat) -> StreamingResponse:
    return StreamingResponse(sse_stream(svc, job, events, fmt), media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def sse_stream(svc: ModelService, job: Job, events: AsyncGenerator[Event | None, None],
                     fmt: StreamFormat) -> AsyncIterator[bytes]:
    svc.open_streams += 1  # a drain waits for this stream's last event
    try:
        reply = Reply(job)
        held = Holdback(reply)
        for chunk in fmt.start():
            yield chunk
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if event is None:
                        yield KEEPALIVE_COMMENT
                    elif (new := reply.add(event)) is not None:
                        ids, details = held.push(*new)
                        if ids:
                            yield fmt.chars(reply, ids, details)
        except Exception as exc:  # never cut the stream silently: tell the client, then finish
            yield fmt.error("internal_error", f"stream failed: {type(exc).__name__}")
        ids, details = held.flush()
        if ids:
            yield fmt.chars(reply, ids, details)
        summary = svc.summary(reply)
        if summary.error:
            yield fmt.error("generation_error", summary.error)
        for chunk in fmt.end(summary):
            yield chunk
    finally:
        svc.open_streams -= 1


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`, cancelling it if the client goes away first (a JSON reply has no stream
    to fail on, so watch the connection for http.disconnect instead)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            # Cancelling closes the request's events, which cancels it in the engine;
            # awaiting it here means that has happened before this handler returns.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientGoneError
    return task.result()


async def json_reply(request: Request, svc: ModelService, job: Job,
                     events: AsyncGenerator[Event | None, None]) -> Reply:
    """The whole reply, for a JSON answer; the client going away cancels it."""
    return await until_disconnected(request, svc.collect(job, events))
