"""Server-sent events, without I/O: lines in, events out, and the meaning of this API's events."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from client.errors import APIConnectionError, APIError, GenerationError
from client.types import GenerationResult


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str
    data: str


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

    Feed it the lines of the reply; it hands back the text of each chunk. At the end, `finish()`
    returns the summary, or raises the error the server reported.
    """

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self._error: tuple[str, str] | None = None
        self.result: GenerationResult | None = None

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
