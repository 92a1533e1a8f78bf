"""Continuation handles: a finished generation's exact state, sealed, so a later request (by
the same caller, to any replica sharing the key) continues the text with no seed re-sent and
no prefill.

An LSTM's whole memory of a text is its state: a few kilobytes (4 KB for models/shakespeare).
The handle carries it, the last character (sampled, not yet fed to the model), the random
stream's position and the sampling parameters, so the continuation produces exactly what one
longer request would have produced. Nothing is kept on the server, so handles survive restarts
and work on every replica with the same CHARLSTM_CONTINUATION_KEY.

Format: `ct2.<salt + ciphertext>.<tag>`, both parts in unpadded base64url, the only spelling
accepted. The payload (msgpack) is sealed with ChaCha20-Poly1305 (authenticated encryption):
the model, state, seed and sampling parameters are unreadable and unalterable without the key.
Each handle has its own key, derived from the service's key and a random 128-bit salt, so no
(key, nonce) pair is ever used twice however many handles are issued (random 96-bit nonces
under one key would be safe only up to about 2^32 handles).

A handle belongs to its caller: it records the tenant (app.auth.tenant, a digest of the bearer
key; b"" without keys), and another key's request is refused with 403, as the state cache
keeps one caller's seeds from another. `ct1` handles (signed, readable, bound to no key) from
earlier versions are refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from functools import lru_cache

import msgspec
import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.artifact import ModelMetadata
from app.engine.messages import Sampling
from app.errors import ForbiddenError, InvalidRequestError

PREFIX = "ct2"
EARLIER_PREFIXES = ("ct1",)
SALT_BYTES = 16
TAG_BYTES = 16
_NONCE = bytes(12)  # each handle's key seals exactly one message
_AAD = PREFIX.encode()


class Handle(msgspec.Struct, array_like=True):
    model: str
    model_id: str  # which export of the model: a handle from another one is refused
    issued_at: float  # unix time
    states: list[bytes]  # float32 (1, size) per state tensor, in model.json order
    last_id: int
    counter: int  # characters sampled so far (the random stream's position)
    sampling: Sampling
    # The step graph whose state this is (model.onnx, or a variant's file): another graph
    # would continue with another text. "" when not known.
    graph: str = ""
    # app.auth.tenant of the caller it was issued to; only that caller may continue it.
    tenant: bytes = b""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Handle)


def model_id(meta: ModelMetadata) -> str:
    """Identifies an export: same name, new weights -> another id (old handles refused)."""
    basis = f"{meta.name}|{meta.created}|{meta.corpus.sha256}|{meta.architecture.parameters}"
    return hashlib.blake2b(basis.encode(), digest_size=8).hexdigest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    """Only the spelling _b64 writes: base64url, no padding, no stray bits in the last
    character; so a handle has exactly one spelling (a cache or log keyed by handles, or a
    revocation list, cannot be sidestepped by re-spelling one). The decoder alone is lenient
    (it skips characters outside the alphabet, reads `+/` as `-_`, takes extra padding and
    ignores stray bits); encoding again and comparing refuses all of those."""
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(raw) != text:
        raise ValueError("not the canonical spelling")
    return raw


@lru_cache(maxsize=4)
def _master_key(key: bytes) -> bytes:
    """CHARLSTM_CONTINUATION_KEY (any length, any strength) -> 32 bytes for handles only."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"charlstm continuation handles ct2").derive(key)


def _sealer(key: bytes, salt: bytes) -> ChaCha20Poly1305:
    handle_key = hashlib.blake2b(salt, key=_master_key(key), digest_size=32).digest()
    return ChaCha20Poly1305(handle_key)


def sign(handle: Handle, key: bytes, *, scope: bytes) -> str:
    """Seal `handle` for the caller `scope` (app.auth.tenant of the request that made it)."""
    handle = msgspec.structs.replace(handle, tenant=scope)
    salt = os.urandom(SALT_BYTES)
    sealed = _sealer(key, salt).encrypt(_NONCE, _encoder.encode(handle), _AAD)
    return f"{PREFIX}.{_b64(salt + sealed[:-TAG_BYTES])}.{_b64(sealed[-TAG_BYTES:])}"


def _open(token: str, key: bytes, field: str) -> Handle:
    parts = token.split(".")
    if len(parts) == 3 and parts[0] in EARLIER_PREFIXES:
        raise InvalidRequestError(f"{field} is from an earlier version of this service, whose "
                                  "handles are no longer accepted; start again from the text")
    not_ours = InvalidRequestError(f"{field} is not a continuation handle from this service")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise not_ours
    try:
        body, tag = _unb64(parts[1]), _unb64(parts[2])
    except (binascii.Error, ValueError):
        raise not_ours from None
    if len(body) < SALT_BYTES or len(tag) != TAG_BYTES:
        raise not_ours
    try:
        payload = _sealer(key, body[:SALT_BYTES]).decrypt(
            _NONCE, body[SALT_BYTES:] + tag, _AAD)
    except InvalidTag:
        raise InvalidRequestError(f"{field} was not issued by this service (or was altered, "
                                  "or the server's continuation key changed)") from None
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError:
        raise InvalidRequestError(f"{field} is damaged") from None


def open_handle(token: str, key: bytes, *, scope: bytes,
                field: str = "continuation") -> Handle:
    """The handle sealed in `token`, or InvalidRequestError (422) saying what is wrong with
    it, or ForbiddenError (403) when it was issued to another caller than `scope`
    (app.auth.tenant of this request). Its model is checked by `verify`."""
    handle = _open(token, key, field)
    if not hmac.compare_digest(handle.tenant, scope):
        raise ForbiddenError(f"{field} was issued to another API key; only the key that made "
                             "it can continue it (start again from the text)")
    return handle


def verify(token: str, key: bytes, name: str, meta: ModelMetadata, state_sizes: list[int],
           ttl_s: float, *, scope: bytes, field: str = "continuation",
           graph: str | None = None, handle: Handle | None = None) -> Handle:
    """open_handle, then: InvalidRequestError (422) unless it fits the model `name` as served
    now (its folder's name, which model.json's need not match; `graph`: the step graph it is
    served with, when known). `handle`: the one open_handle already gave for `token`."""
    handle = handle or open_handle(token, key, scope=scope, field=field)
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
