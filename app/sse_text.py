"""JSON for server-sent events that every reader splits into the same lines.

The event-stream format ends lines at CR, LF and CRLF only, and JSON escapes those inside
strings, so one JSON value is always one `data:` line. But readers that split as Python's
`str.splitlines` does (httpx's `iter_lines`, and so clients built on it) also break at U+2028,
U+2029 and U+0085, which JSON leaves raw, and JavaScript before ES2019 refused U+2028 and U+2029
in string literals. So the JSON here escapes those three as `\\u2028`, `\\u2029` and `\\u0085`,
as JSON-in-JavaScript encoders do: the value a parser reads is unchanged.

    sse_json(payload) -> bytes          the JSON of a dict, list or str (orjson), escaped
    escape_separators(json) -> bytes    the same escaping for JSON serialised elsewhere
                                        (e.g. a pydantic model's model_dump_json)
    sse_event(payload, event=None)      one whole event: [`event: <name>`] `data: <json>`, blank
                                        line
"""

from __future__ import annotations

import re

import orjson

# UTF-8 bytes of each character -> its JSON escape. In UTF-8 these byte strings occur only as
# these characters, and outside strings JSON holds none of them, so replacing bytes is exact.
_ESCAPES = {b"\xe2\x80\xa8": b"\\u2028", b"\xe2\x80\xa9": b"\\u2029", b"\xc2\x85": b"\\u0085"}
_SEPARATOR = re.compile(b"|".join(_ESCAPES))


def escape_separators(json_text: bytes | str) -> bytes:
    """JSON text -> the same JSON value with U+2028, U+2029 and U+0085 written as escapes."""
    data = json_text.encode() if isinstance(json_text, str) else json_text
    if data.isascii():  # most chunks: one fast scan, no copy
        return data
    return _SEPARATOR.sub(lambda m: _ESCAPES[m.group()], data)


def sse_json(payload: object) -> bytes:
    """The payload as one line of JSON that every SSE reader splits the same way."""
    return escape_separators(orjson.dumps(payload))


def sse_event(payload: object, event: str | None = None) -> bytes:
    """One event; `event` None is the default `message` type (a plain `data:` event)."""
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    return head + b"data: " + sse_json(payload) + b"\n\n"
