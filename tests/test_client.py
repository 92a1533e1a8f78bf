"""The Python client (`client/`), against real servers on real ports, plus a few fake replies
for what a healthy server never sends (a failed generation, a broken stream, a 503)."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from client import (
    APIConnectionError,
    APIError,
    AsyncClient,
    AuthenticationError,
    Client,
    GenerationError,
    GenerationResult,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ServerError,
    UnavailableError,
)
from client._client import retry_delay
from client._sse import ServerSentEvent, SSEDecoder
from client.errors import parse_retry_after
from tests.conftest import ROOT, InProcessServer, Server, free_port, run_cli

SUMMARY: dict[str, Any] = {
    "model": "fake", "text": "Hello", "finish_reason": "length", "seed": 1, "seed_text": "A",
    "lowercased": False, "usage": {"seed_chars": 1, "generated_chars": 5},
    "timings": {"queue_ms": 0.1, "prefill_ms": 1.0, "first_char_ms": 1.5, "decode_ms": 2.0,
                "total_ms": 3.0},
}


def sse(*events: tuple[str | None, str]) -> bytes:
    """An event-stream body, CRLF-terminated, with a keep-alive comment up front."""
    parts = [": keep-alive\r\n\r\n"]
    for event, data in events:
        head = f"event: {event}\r\n" if event else ""
        parts.append(head + "".join(f"data: {line}\r\n" for line in data.split("\n")) + "\r\n")
    return "".join(parts).encode()


def fake(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> Client:
    return Client("http://fake", transport=httpx.MockTransport(handler), **kw)


# --- against the real server ------------------------------------------------------------------

def test_client_imports_with_httpx_alone() -> None:
    code = ("import sys, client, client.__main__\n"
            "server_side = {'app', 'fastapi', 'starlette', 'pydantic', 'numpy', 'onnxruntime'}\n"
            "print(sorted(server_side & {m.split('.')[0] for m in sys.modules}))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_generate_returns_every_field_of_the_json_reply(server: Server) -> None:
    params: dict[str, Any] = {"seed_text": "ROMEO:\n", "temperature": 0.5,
                              "max_new_chars": 60, "seed": 42, "details": True}
    with server.client() as raw:
        reply = raw.post("/generate", json=params).json()
    with Client(server.url) as c:
        result = c.generate(**params)
    assert isinstance(result, GenerationResult)
    assert {f.name for f in dataclasses.fields(GenerationResult)} >= set(reply)
    assert (result.model, result.text, result.seed) == ("tiny", reply["text"], 42)
    assert result.finish_reason == "length"
    assert result.usage.generated_chars == len(result.text) == 60
    assert result.usage.seed_chars == 7
    assert result.timings.total_ms >= result.timings.decode_ms > 0
    assert result.details is not None
    assert "".join(d.char for d in result.details) == result.text
    assert all(0 < d.prob <= 1 and len(d.top) == 5 for d in result.details)


def test_stream_chunks_join_to_the_generated_text_with_the_same_seed(server: Server) -> None:
    with Client(server.url) as c:
        plain = c.generate("KING:", temperature=0.8, max_new_chars=200, seed=99, stop=["\n\n\n"])
        with c.stream("KING:", temperature=0.8, max_new_chars=200, seed=99,
                      stop=["\n\n\n"]) as stream:
            chunks = list(stream)
    assert chunks
    assert all(chunks)
    assert "".join(chunks) == plain.text == stream.result.text
    assert stream.result.seed == 99
    assert stream.result.finish_reason == plain.finish_reason


def test_stream_result_is_unavailable_until_the_stream_is_read(server: Server) -> None:
    with Client(server.url) as c:
        stream = c.stream("A", max_new_chars=5000, time_limit_s=30)
        with pytest.raises(RuntimeError, match="read it to the end"):
            _ = stream.result
        start = time.monotonic()
        with stream:
            assert next(stream)
        # closing drops the connection instead of reading the other 4999 characters
        assert time.monotonic() - start < 5
        with pytest.raises(StopIteration):
            next(stream)


def test_async_client_generates_streams_and_lists_models(server: Server) -> None:
    async def session() -> tuple[Any, ...]:
        async with AsyncClient(server.url) as c:
            models = await c.models()
            solo = await c.generate("KING:", temperature=0.8, max_new_chars=100, seed=3)
            async with c.stream("KING:", temperature=0.8, max_new_chars=100, seed=3) as s:
                chunks = [chunk async for chunk in s]
            together = await asyncio.gather(*(
                c.generate("KING:", temperature=0.8, max_new_chars=100, seed=seed)
                for seed in (3, 4, 5, 6)))
            with pytest.raises(NotFoundError, match="model 'nope' not found"):
                await c.generate("KING:", model="nope")
            return models, solo, chunks, s.result, together

    models, solo, chunks, summary, together = asyncio.run(session())
    assert models.default == "tiny"
    assert models.names == ["tiny"]
    assert models.models[0].vocab_size > 0
    assert "".join(chunks) == solo.text == summary.text
    assert together[0].text == solo.text
    assert len({r.text for r in together}) == 4


@pytest.mark.parametrize("streaming", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(("kwargs", "error", "status", "needle"), [
    ({"temperature": -1}, InvalidRequestError, 422, "temperature must be in [0, 5], got -1"),
    ({"seed_text": "caf\u00e9"}, InvalidRequestError, 422, "'\u00e9'"),
    ({"model": "nope"}, NotFoundError, 404, "model 'nope' not found; available: tiny"),
    ({"seed_text": "a" * 70_000}, PayloadTooLargeError, 413, ""),
])
def test_error_replies_raise_typed_errors_with_the_server_message(
        server: Server, streaming: bool, kwargs: dict[str, Any], error: type[APIError],
        status: int, needle: str) -> None:
    params: dict[str, Any] = {"seed_text": "A", "max_new_chars": 5, **kwargs}
    with Client(server.url) as c:
        call = (lambda: next(c.stream(**params))) if streaming else (lambda: c.generate(**params))
        with pytest.raises(error) as info:
            call()
    assert info.value.status == status
    assert needle in info.value.message
    assert needle in str(info.value)


def test_api_key_comes_from_the_argument_or_the_environment(
        tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = InProcessServer(tiny_models, api_keys=["k1"])
    monkeypatch.delenv("CHARLSTM_API_KEY", raising=False)
    try:
        for key in (None, "k2"):
            with Client(srv.url, api_key=key) as c, pytest.raises(AuthenticationError) as info:
                c.models()
            assert info.value.status == 401
            assert "Authorization: Bearer" in info.value.message
        with Client(srv.url, api_key="wrong") as c, pytest.raises(AuthenticationError):
            next(c.stream("A", max_new_chars=5))
        with Client(srv.url, api_key="k1") as c:
            assert c.generate("A", max_new_chars=5).usage.generated_chars == 5
        monkeypatch.setenv("CHARLSTM_API_KEY", "k1")
        monkeypatch.setenv("CHARLSTM_URL", srv.url)
        with Client() as c:
            assert c.base_url == srv.url
            assert c.models().names == ["tiny"]
    finally:
        srv.stop()


def test_overloaded_server_is_retried_no_sooner_than_retry_after(tiny_models: Path) -> None:
    # One row, no queue: while `holder` streams, every other request gets 429.
    srv = InProcessServer(tiny_models, max_batch=1, max_queue=0, max_new_chars=1_000_000)
    try:
        with Client(srv.url) as patient, Client(srv.url, max_retries=0) as impatient, \
                patient.stream("A", max_new_chars=1_000_000, time_limit_s=0.8) as holder:
            assert next(holder)
            with pytest.raises(OverloadedError) as info:
                impatient.generate("B", max_new_chars=5)
            start = time.monotonic()
            retried = patient.generate("B", max_new_chars=5)
            waited = time.monotonic() - start
            _ = "".join(holder)
    finally:
        srv.stop()
    assert (info.value.status, info.value.type, info.value.retry_after) == (429, "overloaded", 1)
    assert holder.result.finish_reason == "time_limit"
    assert retried.usage.generated_chars == 5
    assert waited >= 1.0  # refused at least once, then waited the server's Retry-After


def test_cli_streams_the_same_text_as_generate(server: Server) -> None:
    args = ("--temperature", "0.5", "--max-new-chars", "80", "--seed", "3", "--url", server.url)
    with Client(server.url) as c:
        expected = c.generate("To be, or not", temperature=0.5, max_new_chars=80, seed=3).text
    streamed = run_cli("client", "To be, or not", *args, timeout=60)
    whole = run_cli("client", "To be, or not", *args, "--no-stream", timeout=60)
    for res in (streamed, whole):
        assert res.returncode == 0, res.stderr
        assert res.stdout == "To be, or not" + expected + "\n"
        assert res.stderr.startswith("[length: 80 chars, seed 3, ")


@pytest.mark.parametrize(("args", "needle"), [
    (("--model", "nope"), "model 'nope' not found"),
    (("--temperature", "9"), "temperature must be in [0, 5], got 9"),
    (("--url", "http://127.0.0.1:{port}"), "cannot talk to http://127.0.0.1:"),
])
def test_cli_exits_1_with_a_one_line_error(server: Server, args: tuple[str, ...],
                                           needle: str) -> None:
    args = tuple(a.format(port=free_port()) for a in args)
    res = run_cli("client", "To be", "--url", server.url, *args, timeout=60)
    assert res.returncode == 1
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith("charlstm: error: ")
    assert needle in res.stderr


# --- fake replies: what a healthy server does not send on demand --------------------------------

def test_stream_error_event_raises_generation_error_with_the_partial_result() -> None:
    failed = {**SUMMARY, "finish_reason": "error", "error": "engine step failed"}
    body = sse((None, '{"text": "Hel"}'), (None, '{"text": "lo"}'),
               ("error", '{"error": {"type": "generation_error", "message": "engine step '
                         'failed"}}'),
               ("done", httpx.Response(200, json=failed).text))

    with fake(lambda _: httpx.Response(200, content=body)) as c:
        stream = c.stream("A")
        chunks: list[str] = []
        with pytest.raises(GenerationError) as info:
            chunks.extend(stream)
    assert chunks == ["Hel", "lo"]
    assert (info.value.type, info.value.message) == ("generation_error", "engine step failed")
    assert info.value.result is not None
    assert info.value.result.text == "Hello"
    assert stream.result.finish_reason == "error"


def test_json_reply_with_an_error_raises_generation_error() -> None:
    failed = {**SUMMARY, "finish_reason": "error", "error": "engine step failed"}
    with fake(lambda _: httpx.Response(200, json=failed)) as c, \
            pytest.raises(GenerationError, match="engine step failed") as info:
        c.generate("A")
    assert info.value.result is not None
    assert info.value.result.text == "Hello"


class BrokenStream(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        yield sse((None, '{"text": "Hel"}'))
        raise httpx.RemoteProtocolError("peer closed connection")


def test_a_stream_that_breaks_after_yielding_is_not_retried() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, stream=BrokenStream())

    with fake(handler) as c:
        stream = c.stream("A")
        assert next(stream) == "Hel"
        with pytest.raises(APIConnectionError, match="peer closed"):
            next(stream)
    assert len(calls) == 1


def test_503_is_retried_and_500_is_not() -> None:
    replies = iter([httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {
        "type": "unavailable", "message": "draining"}}), httpx.Response(200, json=SUMMARY)])
    with fake(lambda _: next(replies)) as c:
        assert c.generate("A").text == "Hello"

    calls: list[httpx.Request] = []

    def broken(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(500, text="<html>Internal Server Error</html>")

    with fake(broken) as c, pytest.raises(ServerError) as info:
        c.models()
    assert len(calls) == 1
    assert (info.value.status, info.value.type) == (500, "http_error")
    assert "Internal Server Error" in info.value.message

    with fake(lambda _: httpx.Response(503, headers={"Retry-After": "120"}), max_retries=2) as c, \
            pytest.raises(UnavailableError) as unavailable:
        c.models()  # asks for longer than the client waits: raised, not slept on
    assert unavailable.value.retry_after == 120


def test_retry_delay_backs_off_exponentially_and_honours_retry_after() -> None:
    assert [retry_delay(n, None, 0) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert retry_delay(0, 1.0, 0) == 1.0
    assert retry_delay(3, 1.0, 0) == 4.0
    assert retry_delay(0, 1.0, 0.99) == pytest.approx(1.2475)
    assert retry_delay(0, 3600, 0) is None
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("soon") is None
    in_ten = format_datetime(datetime.now(UTC) + timedelta(seconds=10), usegmt=True)
    assert parse_retry_after(in_ten) == pytest.approx(10, abs=1.5)


def test_sse_decoder_joins_data_lines_and_skips_comments() -> None:
    decoder = SSEDecoder()
    lines = [": ping", "", "event: done", "data: {\"a\":", "data: 1}", "", "data:x", "", "", "x"]
    events = [e for line in lines if (e := decoder.feed(line)) is not None]
    assert events == [ServerSentEvent("done", '{"a":\n1}'), ServerSentEvent("message", "x")]


def test_resume_goes_on_as_one_longer_request(server: Server) -> None:
    with Client(server.url) as c:
        whole = c.generate("KING:", temperature=0.8, max_new_chars=150, seed=5)
        first = c.generate("KING:", temperature=0.8, max_new_chars=60, seed=5, resumable=True)
        assert first.continuation is not None
        rest = c.resume(first.continuation, max_new_chars=90)
    assert first.text + rest.text == whole.text
    assert rest.continuation is None
