"""Continuation handles: a finished generation's exact state, signed, so a later request (to
any replica sharing the key) continues the text with no seed re-sent and no prefill.

An LSTM's whole memory of a text is its state: a few kilobytes (4 KB for models/shakespeare).
The handle carries it, the last character (sampled, not yet fed to the model), the random
stream's position and the sampling parameters, so the continuation produces exactly what one
longer request would have produced. Format: `ct1.<payload>.<mac>`, both base64url; payload
msgpack; mac HMAC-SHA256 over the payload with CHARLSTM_CONTINUATION_KEY. Nothing is kept on
the server, so handles survive restarts and work on every replica with the same key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

import msgspec
import numpy as np
import numpy.typing as npt

from app.artifact import ModelMetadata
from app.engine.messages import Sampling
from app.errors import InvalidRequestError

PREFIX = "ct1"


class Handle(msgspec.Struct, array_like=True):
    model: str
    model_id: str  # which export of the model: a handle from another one is refused
    issued_at: float  # unix time
    states: list[bytes]  # float32 (1, size) per state tensor, in model.json order
    last_id: int
    counter: int  # characters sampled so far (the random stream's position)
    sampling: Sampling
    # The step graph whose state this is (model.onnx, or a variant's file): another graph
    # would continue with another text. "" in handles issued before it was recorded.
    graph: str = ""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Handle)


def model_id(meta: ModelMetadata) -> str:
    """Identifies an export: same name, new weights -> another id (old handles refused)."""
    basis = f"{meta.name}|{meta.created}|{meta.corpus.sha256}|{meta.architecture.parameters}"
    return hashlib.blake2b(basis.encode(), digest_size=8).hexdigest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(handle: Handle, key: bytes) -> str:
    payload = _encoder.encode(handle)
    mac = hmac.new(key, payload, hashlib.sha256).digest()
    return f"{PREFIX}.{_b64(payload)}.{_b64(mac)}"


def _open(token: str, key: bytes, field: str) -> Handle:
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise InvalidRequestError(f"{field} is not a continuation handle from this service")
    try:
        payload, mac = _unb64(parts[1]), _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{field} is not a continuation handle from this service"
                                  ) from None
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        raise InvalidRequestError(f"{field} was not issued by this service (or was altered, "
                                  "or the server's continuation key changed)")
    try:
        handle = _decoder.decode(payload)
    except msgspec.DecodeError:
        raise InvalidRequestError(f"{field} is damaged") from None
    return handle


def handle_model(token: str, key: bytes, field: str = "continuation") -> str:
    """The model a handle belongs to (checked: it was issued by this service)."""
    return _open(token, key, field).model


def verify(token: str, key: bytes, name: str, meta: ModelMetadata, state_sizes: list[int],
           ttl_s: float, field: str = "continuation", graph: str | None = None) -> Handle:
    """The handle inside `token`, or InvalidRequestError saying what is wrong with it.
    `name`: the model as served (its folder's name, which model.json's need not match);
    `graph`: the step graph it is served with now, when known."""
    handle = _open(token, key, field)
    if handle.model != name or handle.model_id != model_id(meta):
        raise InvalidRequestError(f"{field} belongs to another model or an earlier export of "
                                  f"{handle.model!r}; start again from the text")
    age = time.time() - handle.issued_at
    if age > ttl_s:
        raise InvalidRequestError(f"{field} expired {age - ttl_s:.0f} s ago (handles last "
                                  f"{ttl_s:g} s); start again from the text")
    if [len(s) for s in handle.states] != [4 * n for n in state_sizes]:
        raise InvalidRequestError(f"{field} does not fit model {meta.name!r}")
    if handle.graph and graph and handle.graph != graph:
        raise InvalidRequestError(
            f"{field} was made with {handle.graph}, and {name!r} is now served with {graph} "
            "(CHARLSTM_VARIANT): it would not continue the same text; start again from the "
            "text")
    return handle


def states_to_bytes(states: list[npt.NDArray[np.float32]]) -> list[bytes]:
    return [np.ascontiguousarray(a, dtype=np.float32).tobytes() for a in states]


def states_from_bytes(raw: list[bytes]) -> list[npt.NDArray[np.float32]]:
    return [np.frombuffer(r, dtype=np.float32).reshape(1, -1).copy() for r in raw]
