"""The OpenAI-compatible API, driven by the official `openai` client against a real server."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import Server


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_are_listed(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion_matches_generate_for_the_same_seed(client: openai.OpenAI,
                                                       server: Server) -> None:
    out = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=60,
                                    temperature=0.7, seed=11)
    native = httpx.post(f"{server.url}/generate", json={
        "model": "tiny", "seed_text": "ROMEO:", "max_new_chars": 60, "temperature": 0.7,
        "seed": 11}).json()
    assert out.choices[0].text == native["text"]
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert out.usage.completion_tokens == 60
    assert out.usage.prompt_tokens == 6
    assert out.object == "text_completion"


def test_streaming_completion_joins_to_the_same_text(client: openai.OpenAI) -> None:
    kwargs = {"model": "tiny", "prompt": "KING:", "max_tokens": 80, "temperature": 1.0,
              "seed": 3}
    whole = client.completions.create(**kwargs).choices[0].text  # type: ignore[call-overload]
    parts, finish = [], None
    for ev in client.completions.create(stream=True, **kwargs):  # type: ignore[call-overload]
        parts.append(ev.choices[0].text)
        finish = ev.choices[0].finish_reason or finish
    assert "".join(parts) == whole
    assert finish == "length"


def test_stop_and_logprobs(client: openai.OpenAI) -> None:
    probe = client.completions.create(model="tiny", prompt="A", max_tokens=200,
                                      temperature=0.9, seed=5).choices[0].text
    stop = probe[50:52]
    out = client.completions.create(model="tiny", prompt="A", max_tokens=200, temperature=0.9,
                                    seed=5, stop=[stop], logprobs=3)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == probe[: probe.index(stop)]
    assert choice.logprobs is not None
    assert choice.logprobs.tokens == list(choice.text)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs or [])
    assert all(len(t) == 3 for t in choice.logprobs.top_logprobs or [])


def test_errors_reach_the_client_typed(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="model 'nope' not found"):
        client.completions.create(model="nope", prompt="A", max_tokens=5)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature must be in"):
        client.completions.create(model="tiny", prompt="A", max_tokens=5, temperature=7)
    with pytest.raises(openai.UnprocessableEntityError, match="n must be at most 16"):
        client.completions.create(model="tiny", prompt="A", max_tokens=5, n=17)


@pytest.mark.parametrize(("body", "message"), [
    # Issue 11, defect 10: these named the native fields (max_new_chars, seed_text).
    ({"max_tokens": 5001}, "max_tokens must be in [0, 5000], got 5001"),
    ({"max_tokens": -1}, "max_tokens must be in [0, 5000], got -1"),
    ({"max_tokens": 2**64}, "max_tokens must be in [0, 5000], got 18446744073709551616"),
    ({"prompt": "caf\u00e9"}, "prompt has characters not in the vocabulary of model 'tiny': "
                              "'\u00e9' at 3"),
    ({"prompt": ["a" * 4001]}, "prompt must have at most 4000 characters, got 4001"),
    # ... and a non-boolean here was read as true.
    ({"stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage: Input should be a valid boolean"),
    ({"n": 2**64}, "n must be in [1, 4096], got 18446744073709551616"),
    ({"logprobs": 2**63}, "logprobs must be in [0, 5], got 9223372036854775808"),
    ({"seed": 2**63}, "seed must be in [0, 2^63), got 9223372036854775808"),
    ({"temperature": 1e308}, "temperature must be in [0, 5], got 1e+308"),
    ({"top_p": 0}, "top_p must be in (0, 1], got 0"),
])
def test_v1_errors_name_the_v1_fields(server: Server, body: dict[str, object],
                                      message: str) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "A", **body}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json() == {"error": {"type": "invalid_request", "message": message}}


def test_null_max_tokens_means_the_documented_default_of_16(server: Server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    assert schema["components"]["schemas"]["CompletionRequest"]["properties"]["max_tokens"][
        "default"] == 16
    for body in ({"prompt": "A", "max_tokens": None}, {"prompt": "A"}):
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 16
