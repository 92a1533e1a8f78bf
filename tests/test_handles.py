"""Continuation handles belong to their caller and reveal nothing (issue 26, point 3): sealed
with authenticated encryption, bound to the API key that made them (another key gets 403), and
accepted in one spelling only."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from fastapi.testclient import TestClient

from app.continuation import Handle, model_id, sign
from app.engine.messages import Sampling
from app.main import create_app
from app.settings import Settings

K1 = {"Authorization": "Bearer k1"}
K2 = {"Authorization": "Bearer k2"}
SEED = 1234567890123  # 8 bytes in msgpack: easy to look for in the payload
BODY = {"seed_text": "ROMEO:\n", "temperature": 0.9, "seed": SEED, "top_k": 20}


@pytest.fixture(scope="module")
def keyed(tiny_models: Path) -> Iterator[TestClient]:
    """The whole app in this process (engines on threads), keys k1 and k2."""
    app = create_app(Settings(models_dir=tiny_models, default_model="tiny",
                              api_keys=["k1", "k2"], continuation_key="test"))
    with TestClient(app, base_url="http://localhost") as client:
        yield client


def handle_for(client: TestClient, headers: dict[str, str], **body: object) -> str:
    reply = client.post("/generate", headers=headers,
                        json={**BODY, "max_new_chars": 20, "resumable": True, **body})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["continuation"])


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_another_keys_handle_is_refused_with_403_and_its_own_key_continues(
        keyed: TestClient) -> None:
    token = handle_for(keyed, K1)
    stolen = keyed.post("/generate", headers=K2, json={"continuation": token,
                                                      "max_new_chars": 30})
    assert stolen.status_code == 403, stolen.text
    assert stolen.json() == {"error": {"type": "forbidden", "message": (
        "continuation was issued to another API key; only the key that made it can continue "
        "it (start again from the text)")}}
    own = keyed.post("/generate", headers=K1, json={"continuation": token,
                                                   "max_new_chars": 30, "resumable": True})
    assert own.status_code == 200, own.text
    whole = keyed.post("/generate", headers=K1, json={**BODY, "max_new_chars": 50})
    first = keyed.post("/generate", headers=K1, json={**BODY, "max_new_chars": 20})
    assert first.json()["text"] + own.json()["text"] == whole.json()["text"]
    # A handle from a continuation stays its caller's.
    again = keyed.post("/generate", headers=K2, json={
        "continuation": own.json()["continuation"], "max_new_chars": 5})
    assert again.status_code == 403


def test_a_handle_has_one_spelling(keyed: TestClient) -> None:
    token = handle_for(keyed, K1)
    prefix, body, tag = token.split(".")
    assert "-" in token or "_" in token  # so the +/ spelling below differs
    standard = token.translate(str.maketrans("-_", "+/"))
    padded = body + "=" * (-len(body) % 4 or 4)
    # 16 bytes are 22 characters whose last 4 bits are 0: another last character with the
    # same first 2 bits decodes to the same tag.
    stray_bits = tag[:-1] + chr(ord(tag[-1]) + 1)
    respelled = [f"{prefix}.{padded}.{tag}", f"{prefix}.{body}.{tag}==", standard,
                 f"{prefix}.{body}.{stray_bits}", f"{prefix}.{body} .{tag}",
                 f"{prefix}.{body}\n.{tag}"]
    for variant in respelled:
        assert variant != token
        reply = keyed.post("/generate", headers=K1, json={"continuation": variant,
                                                         "max_new_chars": 5})
        assert reply.status_code == 422, (variant, reply.text)
        assert "not a continuation handle from this service" in reply.json()["error"]["message"]
    ok = keyed.post("/generate", headers=K1, json={"continuation": token, "max_new_chars": 5})
    assert ok.status_code == 200


def test_the_payload_is_sealed_not_readable(keyed: TestClient) -> None:
    token = handle_for(keyed, K1)
    assert token.startswith("ct2.")
    sealed = unb64(token.split(".")[1])
    for clear in (b"tiny", msgspec.msgpack.encode(SEED), msgspec.msgpack.encode(0.9),
                  b"model.onnx"):
        assert clear not in sealed
    # Two handles of the same state differ (each has its own salt, hence its own key).
    assert handle_for(keyed, K1) != token


def test_handles_from_an_earlier_version_are_refused_by_name(keyed: TestClient) -> None:
    ct1 = "ct1." + base64.urlsafe_b64encode(b"payload").decode().rstrip("=") + ".AAAA"
    reply = keyed.post("/generate", headers=K1, json={"continuation": ct1, "max_new_chars": 5})
    assert reply.status_code == 422
    assert "from an earlier version of this service" in reply.json()["error"]["message"]


def test_a_keyless_handle_sealed_for_a_key_is_refused(tiny_models: Path) -> None:
    """Without keys every caller is one tenant (b""); a handle sealed for a key's tenant (the
    key then removed from the configuration) is not theirs."""
    app = create_app(Settings(models_dir=tiny_models, default_model="tiny",
                              continuation_key="test"))
    with TestClient(app, base_url="http://localhost") as client:
        svc = app.state.service
        meta = svc.models["tiny"].model.meta
        handle = Handle("tiny", model_id(meta), time.time(),
                        [bytes(4 * s.size) for s in meta.onnx.states], 1, 5, Sampling(seed=3))
        keyed = sign(handle, svc.continuation_key, scope=b"\x01" * 32)
        keyless = sign(handle, svc.continuation_key, scope=b"")
        r1 = client.post("/generate", json={"continuation": keyed, "max_new_chars": 5})
        r2 = client.post("/generate", json={"continuation": keyless, "max_new_chars": 5})
    assert r1.status_code == 403
    assert r2.status_code == 200
