"""Resumable generations (issue 14): a handle continues the text exactly as one longer request
would have; tampered, expired, foreign or conflicting handles get a clear 422."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from app.continuation import Handle, model_id, sign
from app.engine.messages import Sampling
from client import Client
from tests.conftest import InProcessServer, Server
from tests.test_faults import inprocess  # noqa: F401  (fixture)

BODY = {"seed_text": "ROMEO:\n", "temperature": 0.9, "seed": 7, "top_k": 20}


def test_continuing_a_handle_gives_what_one_longer_request_gives(server: Server) -> None:
    with server.client() as c:
        whole = c.post("/generate", json={**BODY, "max_new_chars": 300}).json()
        first = c.post("/generate", json={**BODY, "max_new_chars": 100,
                                          "resumable": True}).json()
        second = c.post("/generate", json={"continuation": first["continuation"],
                                           "max_new_chars": 120, "resumable": True}).json()
        # The last part as a stream: the `done` event carries no handle unless asked.
        with connect_sse(c, "POST", "/generate", json={
                "continuation": second["continuation"], "max_new_chars": 80,
                "stream": True}) as es:
            events = [(ev.event, ev.json()) for ev in es.iter_sse()]
    third = "".join(str(d["text"]) for e, d in events if e == "message")
    assert first["finish_reason"] == second["finish_reason"] == "length"
    assert first["text"] + second["text"] + third == whole["text"]
    assert second["usage"]["seed_chars"] == 0
    assert second["seed"] == 7
    assert "continuation" not in events[-1][1]
    assert len(first["continuation"]) < 8000  # 2 x LSTM(48): a few hundred bytes of state


def test_bad_handles_and_conflicting_fields_get_422(server: Server) -> None:
    with server.client() as c:
        good = c.post("/generate", json={**BODY, "max_new_chars": 20,
                                         "resumable": True}).json()["continuation"]
        prefix, payload, mac = good.split(".")
        flipped = payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:]
        cases: list[tuple[dict[str, Any], str]] = [
            ({"continuation": "nonsense"}, "not a continuation handle"),
            ({"continuation": f"{prefix}.{flipped}.{mac}"}, "not issued by this service"),
            ({"continuation": f"{prefix}.{payload}.{mac[:-4]}AAAA"}, "not issued by this"),
            ({"continuation": good, "seed_text": "KING"}, "do not send seed_text"),
            ({"continuation": good, "temperature": 0.2, "seed": 1},
             "do not send temperature, seed"),
            ({"continuation": good, "max_new_chars": 0}, "max_new_chars"),
        ]
        for body, needle in cases:
            r = c.post("/generate", json=body)
            assert r.status_code == 422, (body, r.text)
            assert needle in r.json()["error"]["message"], (body, r.text)
        ok = c.post("/generate", json={"continuation": good, "max_new_chars": 5})
    assert ok.status_code == 200


def test_expired_and_foreign_handles_are_refused(inprocess: tuple[str, Any]) -> None:  # noqa: F811
    url, app = inprocess
    svc = app.state.service
    meta = svc.models["tiny"].model.meta
    sizes = [s.size for s in meta.onnx.states]

    def handle(**kw: Any) -> str:
        fields: dict[str, Any] = {
            "model": "tiny", "model_id": model_id(meta), "issued_at": time.time(),
            "states": [bytes(4 * n) for n in sizes], "last_id": 1, "counter": 5,
            "sampling": Sampling(seed=3), **kw}
        return sign(Handle(**fields), svc.continuation_key, scope=b"")

    with httpx.Client(base_url=url, timeout=30) as c:
        def refused(token: str) -> str:
            r = c.post("/generate", json={"continuation": token, "max_new_chars": 5})
            assert r.status_code == 422, r.text
            return str(r.json()["error"]["message"])

        assert "expired" in refused(handle(issued_at=time.time() - 10 * 86400))
        assert "another model or an earlier export" in refused(handle(model_id="0" * 16))
        assert "does not fit" in refused(handle(states=[b"\0" * 8]))
        # A state from another graph (the int8 variant) would continue with another text.
        assert "now served with model.onnx" in refused(handle(graph="model.int8.onnx"))
        other_key = sign(Handle("tiny", model_id(meta), time.time(),
                                [bytes(4 * n) for n in sizes], 1, 5, Sampling(seed=3)), b"k",
                         scope=b"")
        assert "not issued by this service" in refused(other_key)
        served = c.post("/generate", json={"continuation": handle(), "max_new_chars": 5})
        same_graph = c.post("/generate", json={"continuation": handle(graph="model.onnx"),
                                               "max_new_chars": 5})
    assert served.status_code == 200  # a handle from before graphs were recorded
    assert len(served.json()["text"]) == 5
    assert same_graph.status_code == 200


@pytest.fixture(scope="module")
def two_models(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[InProcessServer]:
    """`tiny` (the default) and `other`, a copy served under another folder name."""
    models = tmp_path_factory.mktemp("two") / "models"
    shutil.copytree(tiny_models / "tiny", models / "tiny")
    shutil.copytree(tiny_models / "tiny", models / "other")
    srv = InProcessServer(models)
    yield srv
    srv.stop()


def test_a_handle_continues_its_own_model_whatever_the_default(
        two_models: InProcessServer) -> None:
    """The handle names its model: sent as the README shows it (no `model`), it continues
    that model, not the default one; naming another model is refused, naming its own works."""
    body = {**BODY, "model": "other"}
    with two_models.client() as c:
        whole = c.post("/generate", json={**body, "max_new_chars": 90}).json()
        first = c.post("/generate", json={**body, "max_new_chars": 40,
                                          "resumable": True}).json()
        handle = first["continuation"]
        rest = c.post("/generate", json={"continuation": handle, "max_new_chars": 50})
        named = c.post("/generate", json={"continuation": handle, "model": "other",
                                          "max_new_chars": 50})
        wrong = c.post("/generate", json={"continuation": handle, "model": "tiny",
                                          "max_new_chars": 50})
    assert rest.status_code == 200, rest.text
    assert rest.json()["model"] == "other"
    assert first["text"] + rest.json()["text"] == whole["text"]
    assert named.json()["text"] == rest.json()["text"]
    assert wrong.status_code == 422
    assert "belongs to model 'other'" in wrong.json()["error"]["message"]


def test_the_client_resumes_a_non_default_model(two_models: InProcessServer) -> None:
    with Client(two_models.url) as client:
        whole = client.generate("ROMEO:\n", model="other", seed=5, max_new_chars=80)
        first = client.generate("ROMEO:\n", model="other", seed=5, max_new_chars=30,
                                resumable=True)
        assert first.continuation is not None
        rest = client.resume(first.continuation, max_new_chars=50)
    assert rest.model == "other"
    assert first.text + rest.text == whole.text
