"""A request's events as an HTTP reply: one stream lifecycle for every route, formats apart.

`/generate` and `/v1/completions` read the same events (app/service.py `ModelService.open`)
and differ only in how they write them: a `StreamFormat` turns scores, characters, errors and
the summaries into server-sent events; a JSON reply consumes the same events first. A reply
may hold several choices (n, and on /v1 a list of prompts: one job each), read together,
each with its own holdback, their events interleaved as they come. The lifecycle is
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

from app.engine.messages import Detail, Event, Scored
from app.errors import ClientGoneError
from app.graphemes import ClusterBuffer, can_join
from app.schemas import GenerateChoices, GenerateResponse
from app.service import Choices, Job, ModelService, Reply
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
    def scored(self, choices: Choices) -> list[bytes]: ...
    def chars(self, reply: Reply, ids: list[int], details: list[Detail] | None) -> bytes: ...
    def error(self, type_: str, message: str) -> bytes: ...
    def end(self, summaries: list[GenerateResponse]) -> list[bytes]: ...


class NativeFormat:
    """`/generate`: `data: {"text", "details"?}` per chunk (with `index` when it has several
    choices), `event: error` if one happened, `event: done` with the same summary as the JSON
    reply."""

    def __init__(self, several: bool = False) -> None:
        self.several = several

    def start(self) -> list[bytes]:
        return []

    def scored(self, choices: Choices) -> list[bytes]:
        return []

    def chars(self, reply: Reply, ids: list[int], details: list[Detail] | None) -> bytes:
        chunk: dict[str, Any] = {"text": reply.job.served.model.vocab.decode(ids)}
        if self.several:
            chunk = {"index": reply.slot, **chunk}
        if details is not None:
            chunk["details"] = [d.model_dump() for d in reply.char_details(ids, details)]
        return data_event(chunk)

    def error(self, type_: str, message: str) -> bytes:
        return named_event("error", {"error": {"type": type_, "message": message}})

    def end(self, summaries: list[GenerateResponse]) -> list[bytes]:
        return [named_event("done", native_body(summaries, self.several))]


def native_body(summaries: list[GenerateResponse], several: bool) -> dict[str, Any]:
    """/generate's reply: one summary, or with n > 1 (best_of) every choice's."""
    if not several:
        return summaries[0].model_dump(mode="json", exclude_none=True, exclude={"index"})
    return GenerateChoices(model=summaries[0].model, choices=summaries).model_dump(
        mode="json", exclude_none=True)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Events = AsyncGenerator[Event | None, None]
Run = tuple[Job, Events]  # an admitted job and its events


async def merged(runs: list[Run]) -> AsyncGenerator[tuple[int, Event | None], None]:
    """(job number, event) from every run as they come; closing this closes them all."""
    if len(runs) == 1:
        async with contextlib.aclosing(runs[0][1]) as events:
            async for event in events:
                yield 0, event
        return
    gens = [events for _, events in runs]
    pending = {asyncio.ensure_future(anext(g)): i for i, g in enumerate(gens)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: pending[t]):
                i = pending.pop(task)
                try:
                    event = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(gens[i]))] = i
                yield i, event
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)  # a generator can be closed only once it is idle
        for g in gens:
            await g.aclose()


def sse_response(svc: ModelService, runs: list[Run], fmt: StreamFormat) -> StreamingResponse:
    return StreamingResponse(sse_stream(svc, runs, fmt), media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def sse_stream(svc: ModelService, runs: list[Run], fmt: StreamFormat
                     ) -> AsyncIterator[bytes]:
    svc.open_streams += 1  # a drain waits for this stream's last event
    try:
        choices = [Choices(job, base=i * job.n) for i, (job, _) in enumerate(runs)]
        held = {r.slot: Holdback(r) for c in choices for r in c.replies}
        for chunk in fmt.start():
            yield chunk
        try:
            async with contextlib.aclosing(merged(runs)) as events:
                async for i, event in events:
                    if event is None:
                        yield KEEPALIVE_COMMENT
                    elif isinstance(event, Scored):
                        choices[i].add(event)
                        for chunk in fmt.scored(choices[i]):
                            yield chunk
                    elif (new := choices[i].add(event)) is not None:
                        reply, ids, details = new
                        ids, details = held[reply.slot].push(ids, details)
                        if ids:
                            yield fmt.chars(reply, ids, details)
        except Exception as exc:  # never cut the stream silently: tell the client, then finish
            yield fmt.error("internal_error", f"stream failed: {type(exc).__name__}")
        summaries = []
        for c in choices:
            for reply in c.returned():
                ids, details = held[reply.slot].flush()
                if ids:
                    yield fmt.chars(reply, ids, details)
                summaries.append(svc.summary(reply))
        for error in dict.fromkeys(s.error for s in summaries if s.error):
            yield fmt.error("generation_error", error or "")
        for chunk in fmt.end(summaries):
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


async def json_reply(request: Request, svc: ModelService, runs: list[Run]) -> list[Choices]:
    """The whole reply, for a JSON answer; the client going away cancels it."""
    async def collect_all() -> list[Choices]:
        results = await asyncio.gather(*(svc.collect(job, events) for job, events in runs),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [r for r in results if isinstance(r, Choices)]

    choices = await until_disconnected(request, collect_all())
    for i, c in enumerate(choices):
        c.base = i * c.job.n
        for r in c.replies:
            r.slot = c.base + r.index
    return choices
