"""Schemathesis against the real server's own OpenAPI schema: every operation, valid and invalid
inputs. No 5xx, every reply within the schema (status, content type, headers, body), every error
in the one error shape, every stream finished.

About 100 requests by default; CHARLSTM_FULL=1 sends over 1000. Schemathesis 4's pytest loader
(`schemathesis.pytest.from_fixture`) fails under pytest 9 (it sets `node._nodeid`), so each
operation's strategy runs under a plain Hypothesis `@given` instead.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import FULL, Server, start_server, stop_server

pytestmark = pytest.mark.slow  # schemathesis fuzzing against a real server process

# Requests per operation; only POST /generate and /v1/completions can be sent invalid inputs.
CASES = {GenerationMode.POSITIVE: 150 if FULL else 12, GenerationMode.NEGATIVE: 300 if FULL else 24}
MAX_NEW_CHARS = 50  # the fuzz server's limit: streams stay short
TIME_LIMIT_S = 10
OPERATIONS_WITH_INPUT = {"POST /generate"}  # the others take only free-form strings


@pytest.fixture(scope="module")
def fuzz_server(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tiny_models, tmp_path_factory.mktemp("fuzz") / "server.log",
                       max_new_chars=str(MAX_NEW_CHARS), default_new_chars=str(MAX_NEW_CHARS),
                       time_limit_s=str(TIME_LIMIT_S))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server) -> Any:
    config = schemathesis.Config.from_dict({
        # 413 is as good a refusal of an invalid body as 400 or 422.
        "checks": {"negative_data_rejection": {"expected-statuses": ["4XX"]}},
        # Read every stream to its end (schemathesis stops after 20 events by default): streams
        # here are at most MAX_NEW_CHARS characters, one event each at most, plus a few more.
        "max-stream-events": 4 * MAX_NEW_CHARS,
    })
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", config=config)


@pytest.fixture(scope="module")
def vocab(fuzz_server: Server) -> str:
    with fuzz_server.client() as c:
        return "".join(c.get("/models/tiny").json()["vocab"])


# --- checks of our own, beside the built-in ones -----------------------------------------------
def error_bodies_have_the_error_shape(ctx: Any, response: Any, case: Any) -> None:
    if response.status_code < 400:
        return
    body = json.loads(response.content)
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict), body
    assert set(err) == {"type", "message"}, body
    assert isinstance(err["type"], str), body
    assert isinstance(err["message"], str), body
    assert err["type"], body
    assert err["message"], body


def streams_end_with_their_terminal_event(ctx: Any, response: Any, case: Any) -> None:
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code != 200 or not content_type.startswith("text/event-stream"):
        return
    assert not response.stream_cut_short, "the stream did not end within the read timeout"
    events = [e for e in response.content.decode().split("\n\n") if e.strip()]
    datas = [line[len("data: "):] for e in events for line in e.split("\n")
             if line.startswith("data: ")]
    if case.path.startswith("/v1/"):
        assert datas[-1:] == ["[DONE]"], events[-3:]
        datas = datas[:-1]
    else:
        assert events, "empty stream"
        assert events[-1].startswith("event: done\n"), events[-3:]
    for d in datas:
        json.loads(d)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection,
          error_bodies_have_the_error_shape, streams_end_with_their_terminal_event]


# --- steering some valid cases past the range checks to the engine ------------------------------
# The validators check ranges the schema does not state (temperature in [0, 5], top_p in (0, 1],
# max_new_chars <= the server's limit, characters of the vocabulary), so almost every generated
# body would stop at 422. Half of the valid cases are moved into range and reach the engine.
RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0, 5), "top_p": (0.01, 1), "top_k": (0, 40), "seed": (0, 2**63 - 1),
    "max_new_chars": (1, MAX_NEW_CHARS), "max_tokens": (1, MAX_NEW_CHARS),
    "time_limit_s": (0.05, 5), "n": (1, 1), "logprobs": (0, 5),
}


def into_range(value: float, lo: float, hi: float) -> float:
    if isinstance(value, int):
        return int(lo) + abs(value) % (int(hi) - int(lo) + 1)
    if not math.isfinite(value):
        return hi
    return min(hi, lo + abs(value) % (hi - lo + 1e-9))


def steer(body: dict[str, Any], vocab: str) -> dict[str, Any]:
    out = dict(body)
    for key, value in body.items():
        if key in RANGES and isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = into_range(value, *RANGES[key])
        elif key in ("seed_text", "prompt") and isinstance(value, str):
            out[key] = "".join(c for c in value if c in vocab)
        elif key == "prompt" and isinstance(value, list) and value:
            out[key] = ["".join(c for c in str(value[0]) if c in vocab)]
        elif key == "model" and isinstance(value, str):
            out[key] = "tiny"
        elif key == "stop" and isinstance(value, list):
            out[key] = [s for s in value if isinstance(s, str) and 1 <= len(s) <= 64][:8]
    return out


# --- the sweep -------------------------------------------------------------------------------
def run_operation(operation: Any, mode: GenerationMode, vocab: str, session: requests.Session,
                  sent: Counter[str]) -> None:
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode), steered=st.booleans())
    @hypothesis.settings(max_examples=CASES[mode], deadline=None, database=None,
                         derandomize=not FULL,
                         suppress_health_check=list(HealthCheck),
                         phases=[Phase.explicit, Phase.generate, Phase.shrink])
    def one(case: Any, steered: bool) -> None:
        if steered and mode == GenerationMode.POSITIVE and isinstance(case.body, dict):
            case.body = steer(case.body, vocab)
        response = case.call(session=session, timeout=TIME_LIMIT_S + 20)
        sent[operation.label] += 1
        case.validate_response(response, checks=CHECKS)

    one()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
def test_every_operation_answers_within_its_schema(api_schema: Any, vocab: str,
                                                   fuzz_server: Server,
                                                   mode: GenerationMode) -> None:
    sent: Counter[str] = Counter()
    failures: list[str] = []
    labels = []
    with requests.Session() as session:
        for result in api_schema.get_all_operations():
            operation = result.ok()
            labels.append(operation.label)
            try:
                run_operation(operation, mode, vocab, session, sent)
            except hypothesis.errors.Unsatisfiable:
                # Nothing to make invalid: no body and no parameter beyond free-form strings.
                if mode == GenerationMode.POSITIVE or operation.label in OPERATIONS_WITH_INPUT:
                    raise
            except BaseException as exc:  # schemathesis' FailureGroup is a BaseExceptionGroup
                failures.append(f"{operation.label}:\n{exc}")
    print(f"\n{mode.value}: {sum(sent.values())} requests {dict(sent)}")
    assert {"POST /generate", "GET /models", "GET /models/{name}", "GET /health", "GET /ready",
            "GET /metrics"} <= set(labels)
    assert not failures, "\n\n".join(failures)
    assert "Traceback" not in fuzz_server.log()
    if FULL:
        assert sum(sent.values()) >= 500, sent  # x2 modes: over 1000 in all


def test_steered_cases_reach_the_engine(fuzz_server: Server, vocab: str) -> None:
    """The steering above is what lets fuzzing reach generation: check it produces bodies the
    service accepts (a regression here would quietly turn the sweep into a 422 test)."""
    body = steer({"model": "x", "seed_text": "é\x00ab", "temperature": 1e300, "top_p": -3.5,
                  "top_k": -7, "seed": -1, "max_new_chars": 10**9, "time_limit_s": float("inf"),
                  "stop": ["", "a" * 100, "x"], "stream": True}, vocab)
    with fuzz_server.client() as c:
        r = c.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert "event: done" in r.text


@pytest.mark.parametrize("raw", [b"\xff", b'{"seed_text": "\xe9"}'])
def test_a_body_that_is_not_utf8_gets_422(fuzz_server: Server, raw: bytes) -> None:
    r = httpx.post(f"{fuzz_server.url}/generate", content=raw,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request"



def test_streamed_completions_are_documented(fuzz_server: Server) -> None:
    schema = httpx.get(f"{fuzz_server.url}/openapi.json", timeout=30).json()
    assert "text/event-stream" in (
        schema["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"])


@pytest.mark.parametrize("body", [{"temperature": False}, {"temperature": "0.5"},
                                  {"top_k": True}, {"max_new_chars": "3"}, {"stream": "yes"}],
                         ids=["bool-temperature", "string-temperature", "bool-top_k",
                              "string-max_new_chars", "string-stream"])
def test_values_of_the_wrong_json_type_are_refused(fuzz_server: Server,
                                                   body: dict[str, Any]) -> None:
    r = httpx.post(f"{fuzz_server.url}/generate", json={"max_new_chars": 3, **body}, timeout=30)
    assert r.status_code == 422, r.text
