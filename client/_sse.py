"""Server-sent events, without I/O: bytes in, lines, events out, and the meaning of this API's
events."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from client.errors import APIConnectionError, APIError, GenerationError
from client.types import GenerationResult


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str
    data: str


_LINE_END = re.compile(rb"\r\n?|\n")


class LineSplitter:
    """Bytes of an event stream -> its lines, without their terminators.

    The format ends a line at CR, LF or CRLF and nowhere else. httpx's `iter_lines` splits as
    `str.splitlines` does, also at U+2028, U+2029, U+0085 and a few C0 controls, which a JSON
    string may hold raw: one `data:` line becomes two halves that are not JSON. Splitting the
    bytes is exact: in UTF-8 the bytes of CR and LF occur only as those characters. Each whole
    line is decoded alone (as UTF-8, bad bytes replaced, as the format says), so a character
    split across network reads is never cut.
    """

    def __init__(self) -> None:
        self._partial = bytearray()
        self._after_cr = False  # the last read ended in CR: an LF first in the next is its pair
        self._first = True

    def feed(self, data: bytes) -> Iterator[str]:
        start = 0
        if self._after_cr and data[:1] == b"\n":
            start = 1
        if data:
            self._after_cr = data.endswith(b"\r")
        for match in _LINE_END.finditer(data, start):
            self._partial += data[start:match.start()]
            start = match.end()
            yield self._line()
        self._partial += data[start:]

    def _line(self) -> str:
        line = self._partial.decode("utf-8", errors="replace")
        self._partial.clear()
        if self._first:
            self._first = False
            line = line.removeprefix("\ufeff")  # one byte-order mark may open the stream
        return line


class SSEDecoder:
    """The event-stream format (WHATWG HTML, "Parsing an event stream") for `event` and `data`
    fields; `id` and `retry` are ignored, since a generation cannot be resumed."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> ServerSentEvent | None:
        """Take one line without its terminator; return the event a blank line completes."""
        if not line:
            event = ServerSentEvent(self._event or "message", "\n".join(self._data))
            has_data = bool(self._data)
            self._event, self._data = "", []
            return event if has_data else None
        if line.startswith(":"):  # a comment: the server's keep-alive
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        return None


class GenerationEvents:
    """The events of one streamed generation: text chunks, at most one `error`, then `done`.

    Feed it the bytes of the reply (or its lines); it hands back the text of each chunk. At the
    end, `finish()` returns the summary, or raises the error the server reported.
    """

    def __init__(self) -> None:
        self._lines = LineSplitter()
        self._decoder = SSEDecoder()
        self._error: tuple[str, str] | None = None
        self.result: GenerationResult | None = None

    def feed_bytes(self, data: bytes) -> list[str]:
        """The texts of the chunks these bytes of the reply complete, in order (often none)."""
        return [text for line in self._lines.feed(data) if (text := self.feed(line))]

    def feed(self, line: str) -> str:
        """The new text this line completes ("" for most lines)."""
        event = self._decoder.feed(line)
        if event is None:
            return ""
        payload = _payload(event)
        if event.event == "message":
            return str(payload.get("text", ""))
        if event.event == "error":
            err = payload.get("error")
            err = err if isinstance(err, dict) else {}
            self._error = (str(err.get("type", "generation_error")),
                           str(err.get("message", "generation failed")))
        elif event.event == "done":
            self.result = GenerationResult.from_json(payload)
        return ""

    def finish(self) -> GenerationResult:
        if self._error is not None:
            raise GenerationError(*self._error, result=self.result)
        if self.result is None:
            raise APIConnectionError("the stream ended before its `done` event")
        return self.result


def _payload(event: ServerSentEvent) -> dict[str, Any]:
    try:
        payload = json.loads(event.data)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise APIError(200, "invalid_response",
                       f"`{event.event}` event does not hold a JSON object: {event.data[:200]!r}")
    return payload
