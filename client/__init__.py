"""Python client for the charlstm text-generation service. Needs httpx only.

    from client import Client

    with Client("http://127.0.0.1:8000") as c:
        print(c.generate("ROMEO:\n", temperature=0.5, max_new_chars=200, seed=42).text)
        with c.stream("To be, or not", temperature=0.5) as s:
            for chunk in s:
                print(chunk, end="", flush=True)
        print(s.result.finish_reason)
"""

from client._client import AsyncClient, AsyncStream, Client, Stream
from client.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    CharlstmError,
    GenerationError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ServerError,
    UnavailableError,
)
from client.types import (
    Alternative,
    CharDetail,
    FinishReason,
    GenerationResult,
    ModelInfo,
    ModelList,
    Timings,
    Usage,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "Alternative",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "CharDetail",
    "CharlstmError",
    "Client",
    "FinishReason",
    "GenerationError",
    "GenerationResult",
    "InvalidRequestError",
    "ModelInfo",
    "ModelList",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "ServerError",
    "Stream",
    "Timings",
    "UnavailableError",
    "Usage",
]
