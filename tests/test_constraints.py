"""Constrained generation (issue 19): regex, choice and JSON-schema constraints compiled to a DFA
over the model's vocabulary, and logit_bias.

Models are tiny untrained LSTMs from tests/modelgen.py (no TensorFlow): `json` has JSON's
characters, `letters` lacks `{`, `"` and digits (as models/shakespeare does). Untrained weights
make the model's own choices arbitrary, so any text that matches did so because of the mask."""

from __future__ import annotations

import json
import re
import string
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from app.constraints import ConstraintError, ConstraintSpec, compile_constraint
from app.decode import DecodeGraphs, serving_decode_graphs
from app.engine.batch import Sequence
from app.engine.messages import GenerationRequest
from app.runtime import OnnxModel, RuntimeOptions, load_model
from tests.conftest import InProcessServer
from tests.fakes import request, run_core
from tests.modelgen import build_model

JSON_VOCAB = sorted(set(string.ascii_letters + string.digits + ' \n{}[]":,.-+_'))
LETTERS_VOCAB = sorted(set(string.ascii_letters + " \n.,"))
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer"},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "ok"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("constraints") / "models"
    # A strong bias towards the digit 7 and the space: the mask has to work against the model.
    build_model(root, "json", JSON_VOCAB, units=16, seed=19, logit_bias={"7": 3.0, " ": 2.0})
    build_model(root, "letters", LETTERS_VOCAB, units=8, seed=20)
    return root


@pytest.fixture(scope="module")
def model(models: Path) -> OnnxModel:
    return load_model(models / "json", RuntimeOptions(device="cpu"))


@pytest.fixture(scope="module")
def graphs(model: OnnxModel) -> DecodeGraphs:
    g = serving_decode_graphs(model, 8)
    assert g is not None
    return g


def constrained(model: OnnxModel, kind: Any, value: Any, seed: int, **kw: Any
                ) -> GenerationRequest:
    c = compile_constraint(ConstraintSpec.of(kind, value), model.vocab.chars)
    p: dict[str, Any] = {"max_new": 120, "temperature": 1.0, "seed": seed, **kw}
    return request(model.vocab.encode(p.pop("seed_text", "x")), constraint=c.constraint, **p)


run = run_core


def text(model: OnnxModel, s: Sequence) -> str:
    return model.vocab.decode(s.ids)


# --- outputs always match ---------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "value", "check"), [
    ("regex", r"[A-Z][a-z]+( [a-z]+){0,3}\.", lambda t: re.fullmatch(r"[A-Z][a-z]+( [a-z]+){0,3}\.",
                                                                     t)),
    ("choice", ["yes", "no", "maybe", "yes7"], lambda t: t in ("yes", "no", "maybe", "yes7")),
    ("json", SCHEMA, lambda t: set(json.loads(t)) >= {"name", "age", "ok"}),
])
def test_sampled_text_always_matches_the_constraint(model: OnnxModel, kind: str, value: Any,
                                                    check: Any) -> None:
    # 48 seeds at temperature 1.5 (a flat distribution) and a short max_new: the row must be
    # steered to acceptance within its characters, and end with reason "stop" when complete.
    reqs = [constrained(model, kind, value, seed, max_new=60, temperature=1.5)
            for seed in range(48)]
    seqs = run(model, None, reqs, max_batch=16)
    texts = [text(model, s) for s in seqs]
    for t, s in zip(texts, seqs, strict=True):
        assert check(t), t
        if kind != "regex":
            assert s.finish_reason == "stop"
    assert len(set(texts)) >= 3  # really sampled


def test_json_object_output_parses(model: OnnxModel) -> None:
    seqs = run(model, None, [constrained(model, "json_object", None, s, max_new=80)
                             for s in range(16)])
    for s in seqs:
        assert isinstance(json.loads(text(model, s)), dict)


def test_a_constraint_ends_the_text_within_max_new_by_steering_to_acceptance(
        model: OnnxModel) -> None:
    # [a-z]+\. is never complete before the '.', which the model rarely picks: the last
    # character is forced.
    seqs = run(model, None, [constrained(model, "regex", r"[a-z]+\.", s, max_new=10)
                             for s in range(20)])
    for s in seqs:
        assert re.fullmatch(r"[a-z]+\.", text(model, s))
        assert len(s.ids) <= 10


# --- reproducibility: alone, under load, graph vs host -------------------------------------------
def test_seeded_constrained_text_is_the_same_alone_and_under_load(
        model: OnnxModel, graphs: DecodeGraphs) -> None:
    mine = constrained(model, "json", SCHEMA, 7, temperature=0.9)
    alone = run(model, None, [mine])[0]
    crowd = [constrained(model, "regex", r"[a-z ]{5,40}\.", 100 + i) for i in range(6)]
    crowd += [request(model.vocab.encode("ab" * (i + 1) * 30), max_new=150, seed=200 + i,
                      temperature=1.0) for i in range(6)]
    for decode in (None, graphs):
        beside = run(model, decode, [*crowd[:3], mine, *crowd[3:]], prefill_chunk_chars=16)[3]
        assert beside.ids == alone.ids
    json.loads(text(model, alone))


def test_graph_and_host_engines_give_the_same_constrained_and_free_ids(
        model: OnnxModel, graphs: DecodeGraphs) -> None:
    # Constrained rows join and leave while free rows decode: the graph engine switches
    # between its K-step graph and host decoding; every row's ids must match the host engine.
    reqs: list[GenerationRequest] = []
    for i in range(18):
        if i % 3 == 0:
            reqs.append(constrained(model, "choice", ["alpha", "beta", "gamma delta"], i,
                                    details=i % 2 == 0))
        elif i % 3 == 1:
            reqs.append(request(model.vocab.encode("seed" * (i + 1)), max_new=5 + 13 * i,
                                seed=i, temperature=0.8, top_k=[0, 5][i % 2],
                                details=i % 4 == 1))
        else:
            reqs.append(request(model.vocab.encode("x"), max_new=40, seed=i,
                                logit_bias=((model.vocab.encode("7")[0].item(), -100.0),)))
    host = run(model, None, reqs, max_batch=8, prefill_chunk_chars=7)
    graph = run(model, graphs, reqs, max_batch=8, prefill_chunk_chars=7)
    for h, g in zip(host, graph, strict=True):
        assert g.ids == h.ids
        assert (g.finish_reason, g.sampled) == (h.finish_reason, h.sampled)
        assert [d[2] is None for d in g.details] == [d[2] is None for d in h.details]


def test_free_seeded_text_does_not_change_beside_constrained_rows(
        model: OnnxModel, graphs: DecodeGraphs) -> None:
    free = request(model.vocab.encode("hello"), max_new=200, seed=3, temperature=1.0)
    alone = run(model, graphs, [free])[0]
    others = [constrained(model, "regex", r"[a-z]{3,30}\.", 50 + i, max_new=40)
              for i in range(4)]
    beside = run(model, graphs, [others[0], free, *others[1:]])[0 + 1]
    assert beside.ids == alone.ids


def test_details_report_the_models_and_the_constrained_probability(model: OnnxModel) -> None:
    s = run(model, None, [constrained(model, "choice", ["yes", "no"], 1, details=True)])[0]
    assert len(s.details) == len(s.ids) > 1
    raw, _top, shaped = s.details[-1]
    assert shaped == pytest.approx(1.0)  # the last character of a choice is forced
    assert raw < 1.0


# --- logit_bias -----------------------------------------------------------------------------
def test_logit_bias_minus_100_never_produces_the_character(model: OnnxModel,
                                                             graphs: DecodeGraphs) -> None:
    seven = int(model.vocab.encode("7")[0])
    free = run(model, None, [request(model.vocab.encode("x"), max_new=100, seed=s)
                             for s in range(4)])
    assert sum(s.ids.count(seven) for s in free) > 20  # the model likes it
    banned = run(model, graphs, [request(model.vocab.encode("x"), max_new=100, seed=s,
                                         temperature=2.0, logit_bias=((seven, -100.0),))
                                 for s in range(24)])
    assert all(seven not in s.ids for s in banned)


def test_logit_bias_plus_100_forces_the_character(model: OnnxModel) -> None:
    q = int(model.vocab.encode("q")[0])
    seqs = run(model, None, [request(model.vocab.encode("x"), max_new=30, seed=s,
                                     logit_bias=((q, 100.0),)) for s in range(8)])
    assert all(set(s.ids) == {q} for s in seqs)


# --- compile errors and bounds -------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "value", "message"), [
    ("regex", "[a-", "invalid regex: unterminated character set"),
    ("regex", r"(a)\1", "backreferences"),
    ("regex", r"(?=a)a", "lookahead"),
    ("json", {"type": "integer", "minimum": 3}, "keyword 'minimum' (at $) is not supported"),
    ("json", {"type": "object", "properties": {"a": {"type": "string", "uniqueItems": True}}},
     "keyword 'uniqueItems' (at $.properties.a)"),
    ("regex", r"(a|b)*a(a|b){30}", "constraint too large"),
    ("regex", "a{100000}", "constraint too large"),
])
def test_bad_constraints_are_refused_with_a_reason(kind: str, value: Any, message: str) -> None:
    with pytest.raises(ConstraintError, match=re.escape(message)):
        compile_constraint(ConstraintSpec.of(kind, value), JSON_VOCAB)  # type: ignore[arg-type]


def test_a_hostile_regex_is_refused_within_the_deadline() -> None:
    t0 = time.perf_counter()
    with pytest.raises(ConstraintError, match=r"took more than 0\.3 s"):
        compile_constraint(ConstraintSpec.of("regex", r"(.?){1000}"), JSON_VOCAB, deadline_s=0.3)
    assert time.perf_counter() - t0 < 0.6


# --- over HTTP ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(models: Path) -> Iterator[InProcessServer]:
    s = InProcessServer(models, default="json", max_batch=64)
    yield s
    s.stop()


def post(srv: InProcessServer, path: str, body: dict[str, Any]) -> httpx.Response:
    with srv.client() as c:
        return c.post(path, json=body)


def test_generate_with_structured_outputs(srv: InProcessServer) -> None:
    r = post(srv, "/generate", {"seed_text": "x", "seed": 4, "max_new_chars": 100,
                                "details": True,
                                "structured_outputs": {"json": SCHEMA}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["finish_reason"] == "stop"
    assert {"name", "age", "ok"} <= set(json.loads(body["text"]))
    assert all(d["constrained_prob"] is not None for d in body["details"])
    r = post(srv, "/generate", {"seed_text": "x", "seed": 4, "max_new_chars": 20,
                                "structured_outputs": {"choice": ["red", "green"]},
                                "logit_bias": {"d": -100}})
    assert r.json()["text"] == "green"


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"structured_outputs": {"regex": "(a"}}, 422, "structured_outputs: invalid regex: missing )"),
    ({"structured_outputs": {"json": {"type": "number", "multipleOf": 2}}}, 422,
     "json schema keyword 'multipleOf'"),
    ({"model": "letters", "structured_outputs": {"json": SCHEMA}}, 422,
     "needs characters not in the model's vocabulary (or banned by logit_bias): "
     "'\"', '0', ':', '{', '}'"),
    ({"model": "letters", "structured_outputs": {"choice": ["ok", "no 1"]}}, 422,
     "choice 'no 1' has characters not in the model's vocabulary"),
    ({"max_new_chars": 5, "structured_outputs": {"regex": "[a-z]{6}"}}, 422,
     "the shortest text the constraint accepts has 6 characters, more than max_new_chars (5)"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, 422,
     "exactly one of regex, choice, json, json_object; got regex, choice"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, 422, "grammar"),
    ({"structured_outputs": {"regex": "ab"}, "resumable": True}, 422,
     "resumable cannot be combined with structured_outputs"),
    ({"structured_outputs": {"regex": "ab"}, "logit_bias": {"b": -100}}, 422,
     "banned by logit_bias): 'b'"),
    ({"logit_bias": {"{": 1, "é": 2}}, 422,
     "logit_bias keys must be characters of model 'json''s vocabulary; unknown: 'é'"),
    ({"logit_bias": {"a": 101}}, 422, "must be in [-100, 100] (-100 bans the character), got 101"),
])
def test_generate_refusals(srv: InProcessServer, body: dict[str, Any], status: int,
                           message: str) -> None:
    r = post(srv, "/generate", {"seed_text": "x", **body})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_a_hostile_regex_does_not_hold_the_server(srv: InProcessServer) -> None:
    health: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with srv.client() as c:
            while not done.is_set():
                t0 = time.perf_counter()
                assert c.get("/health").status_code == 200
                health.append(time.perf_counter() - t0)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    t0 = time.perf_counter()
    try:
        r = post(srv, "/generate", {"structured_outputs": {"regex": r"(.?){1000}"}})
    finally:
        done.set()
        poller.join()
    assert time.perf_counter() - t0 < 2.0
    assert r.status_code == 422
    assert "constraint too complex" in r.json()["error"]["message"]
    assert len(health) >= 5
    assert max(health) < 0.5


def test_v1_aliases_and_response_format(srv: InProcessServer) -> None:
    base = {"prompt": "x", "max_tokens": 80, "seed": 2}
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"guided_regex": r"[a-z]{2,5}\."}, lambda t: re.fullmatch(r"[a-z]{2,5}\.", t)),
        ({"guided_choice": ["one", "two"]}, lambda t: t in ("one", "two")),
        ({"guided_json": SCHEMA}, lambda t: "age" in json.loads(t)),
        ({"structured_outputs": {"choice": ["ab", "cd"]}}, lambda t: t in ("ab", "cd")),
        ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p",
                                                                     "schema": SCHEMA}}},
         lambda t: "ok" in json.loads(t)),
        ({"response_format": {"type": "text"}}, lambda t: len(t) == 80),
    ]
    for extra, check in cases:
        r = post(srv, "/v1/completions", {**base, **extra})
        assert r.status_code == 200, (extra, r.text)
        choice = r.json()["choices"][0]
        assert check(choice["text"]), (extra, choice["text"])
    r = post(srv, "/v1/completions", {**base, "guided_regex": "a", "guided_choice": ["b"]})
    assert r.status_code == 422
    assert "one constraint per request, got guided_regex, guided_choice" in r.text


def test_v1_logit_bias_by_token_id(srv: InProcessServer) -> None:
    with srv.client() as c:
        vocab = c.get("/models/json").json()["vocab"]
    seven = vocab.index("7")
    r = post(srv, "/v1/completions", {"prompt": "x", "max_tokens": 40, "seed": 1,
                                      "logit_bias": {str(seven): 100}})
    assert r.json()["choices"][0]["text"] == "7" * 40
    r = post(srv, "/v1/completions", {"prompt": "x", "logit_bias": {"999": 1}})
    assert r.status_code == 422
    assert "token ids in [0, " in r.text
    assert "unknown: id 999" in r.text


def test_the_openai_client_sends_constraints_in_extra_body(srv: InProcessServer) -> None:
    llm = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    out = llm.completions.create(model="json", prompt="x", max_tokens=50, seed=5,
                                 extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[a-z]+"}})
    assert re.fullmatch(r"[0-9]{3}-[a-z]+", out.choices[0].text)
    out = llm.completions.create(model="json", prompt="x", max_tokens=50, seed=5,
                                 extra_body={"guided_choice": ["left", "right"]})
    assert out.choices[0].text in ("left", "right")
    assert out.choices[0].finish_reason == "stop"
    with pytest.raises(openai.UnprocessableEntityError, match="invalid regex"):
        llm.completions.create(model="json", prompt="x", extra_body={"guided_regex": "("})


def test_stream_with_a_constraint(srv: InProcessServer) -> None:
    with srv.client() as c, c.stream("POST", "/generate", json={
            "seed_text": "x", "stream": True, "seed": 9, "max_new_chars": 100,
            "structured_outputs": {"json": SCHEMA}}) as r:
        body = r.read().decode()
    done = [json.loads(line[6:]) for line in body.splitlines()
            if line.startswith("data: ") and '"finish_reason"' in line][-1]
    assert "name" in json.loads(done["text"])


def test_compiled_constraints_are_cached(srv: InProcessServer) -> None:
    svc = srv.app.state.service
    before = len(svc.constraints.cache)
    for _ in range(3):
        assert post(srv, "/generate", {"seed_text": "x", "max_new_chars": 30, "structured_outputs":
                                       {"regex": "cached[a-z]{3}"}}).status_code == 200
    assert len(svc.constraints.cache) == before + 1
    assert np.frombuffer(next(reversed(svc.constraints.cache.values())).constraint.table,
                         np.int32).size > 0


def test_min_p_one_keeps_only_the_likeliest_character(tiny_models: Path) -> None:
    """min_p 1 drops every character less likely than the likeliest: sampled text equals the
    greedy one for any seed; a small min_p still samples (seeds differ), and it reproduces."""
    srv = InProcessServer(tiny_models)
    try:
        with srv.client() as c:
            def text(**kw: Any) -> str:
                r = c.post("/generate", json={"seed_text": "ROMEO:\n", "max_new_chars": 60,
                                              **kw})
                assert r.status_code == 200, r.text
                return str(r.json()["text"])

            greedy = text(temperature=0)
            assert all(text(temperature=1.0, seed=s, min_p=1.0) == greedy for s in range(4))
            sampled = {text(temperature=1.0, seed=s, min_p=0.05) for s in range(4)}
            assert len(sampled) > 1
            assert text(temperature=1.0, seed=7, min_p=0.05) == text(temperature=1.0, seed=7,
                                                                      min_p=0.05)
            v1 = c.post("/v1/completions", json={"prompt": "ROMEO:\n", "max_tokens": 60,
                                                 "temperature": 1.0, "seed": 3, "min_p": 1.0})
            assert v1.json()["choices"][0]["text"] == greedy
            bad = c.post("/generate", json={"seed_text": "A", "min_p": 1.5})
            assert bad.status_code == 422
            assert "min_p must be in [0, 1]" in bad.json()["error"]["message"]
    finally:
        srv.stop()
