"""Scoring, prompt lists, n choices, vLLM's tokenizer routes and the field list, through the
official openai client and plain HTTP, against the bundled Shakespeare model served in this
process; scores checked against the step graph run one character at a time."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from app.engine.messages import choice_seed
from app.support import FIELDS, NEUTRAL, markdown_table
from tests.conftest import ROOT, InProcessServer
from tests.stepwise import stepwise as stepwise_in

MODEL_DIR = ROOT / "models" / "shakespeare"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    models = tmp_path_factory.mktemp("scoring") / "models"
    shutil.copytree(MODEL_DIR, models / "shakespeare")
    server = InProcessServer(models, default="shakespeare", max_batch=32, max_n=8)
    yield server
    server.stop()


@pytest.fixture
def client(srv: InProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)


def stepwise(text: str) -> tuple[float, ...]:
    return stepwise_in(MODEL_DIR, text)


def post(srv: InProcessServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", json=body, timeout=60)


PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


@pytest.mark.parametrize("max_tokens", [0, 1, 5])
def test_echo_scores_every_prompt_character_then_the_generated_ones(
        client: openai.OpenAI, max_tokens: int) -> None:
    out = client.completions.create(model="shakespeare", prompt=PROMPT, max_tokens=max_tokens,
                                    echo=True, logprobs=2, temperature=0, seed=1234)
    choice = out.choices[0]
    lp = choice.logprobs
    assert lp is not None
    assert lp.token_logprobs is not None
    assert lp.top_logprobs is not None
    assert choice.text.startswith(PROMPT)
    assert len(choice.text) == len(PROMPT) + max_tokens
    assert lp.tokens == list(choice.text)
    assert lp.text_offset == list(range(len(choice.text)))
    assert lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None
    prompt_lps = lp.token_logprobs[1:len(PROMPT)]
    assert np.max(np.abs(np.array(prompt_lps) - stepwise(PROMPT))) < 1e-4
    for top in lp.top_logprobs[1:]:
        assert len(top) == 2
    # lm-eval's greedy test: the chosen character's value equals the top one's exactly
    for c, v, top in zip(lp.tokens[1:len(PROMPT)], prompt_lps, lp.top_logprobs[1:],
                         strict=False):
        if c in top:
            assert top[c] == v
    assert len(lp.token_logprobs) == len(choice.text)


def test_echo_without_logprobs_returns_the_prompt_only(client: openai.OpenAI) -> None:
    out = client.completions.create(model="shakespeare", prompt="KING:", max_tokens=0,
                                    echo=True)
    assert out.choices[0].text == "KING:"
    assert out.choices[0].logprobs is None
    assert out.choices[0].finish_reason == "length"


def test_prompt_lists_of_strings_and_token_ids_give_one_choice_each_times_n(
        client: openai.OpenAI, srv: InProcessServer) -> None:
    prompts = ["KING:\n", "QUEEN:\n", "ROMEO:\n"]
    ids = [post(srv, "/tokenize", {"prompt": p}).json()["tokens"] for p in prompts]
    texts = client.completions.create(model="shakespeare", prompt=prompts, max_tokens=12,
                                      n=2, seed=5, temperature=1.0)
    by_ids = client.completions.create(model="shakespeare", prompt=ids, max_tokens=12, n=2,
                                       seed=5, temperature=1.0)
    assert [c.index for c in texts.choices] == list(range(6))
    assert [c.text for c in texts.choices] == [c.text for c in by_ids.choices]
    one_id_list = client.completions.create(model="shakespeare", prompt=ids[1], max_tokens=12,
                                            n=2, seed=5, temperature=1.0)
    assert [c.text for c in one_id_list.choices] == [c.text for c in texts.choices[2:4]]
    # each choice reproduces alone, with the seed derived from (seed, index)
    alone = client.completions.create(model="shakespeare", prompt=prompts[2], max_tokens=12,
                                      seed=choice_seed(5, 1), temperature=1.0)
    assert alone.choices[0].text == texts.choices[5].text
    assert texts.usage is not None
    assert texts.usage.prompt_tokens == sum(map(len, prompts))
    assert texts.usage.completion_tokens == 6 * 12


def test_streamed_choices_interleave_each_with_its_index(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "shakespeare", "prompt": ["KING:\n", "ROMEO:\n"],
                          "max_tokens": 40, "n": 2, "seed": 9, "temperature": 1.0}
    whole = client.completions.create(**kw)
    parts: dict[int, str] = {i: "" for i in range(4)}
    finished = set()
    order = []
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            parts[c.index] += c.text
            order.append(c.index)
            if c.finish_reason:
                finished.add(c.index)
    assert [parts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert finished == {0, 1, 2, 3}
    assert order != sorted(order)  # interleaved, not one choice after the other


def test_tokenizer_routes_have_vllm_shapes_and_a_token_is_a_character(
        srv: InProcessServer) -> None:
    info = httpx.get(f"{srv.url}/tokenizer_info", timeout=30).json()
    assert info["bos_token"] is None
    assert info["eos_token"] is None
    assert info["primer"] == "\n"
    assert info["vocab"][info["primer_token_id"]] == "\n"
    r = post(srv, "/tokenize", {"prompt": "To be", "add_special_tokens": False}).json()
    assert r["count"] == 5
    assert r["max_model_len"] == 4000
    assert [info["vocab"][i] for i in r["tokens"]] == list("To be")
    assert post(srv, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "To be"}


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/tokenize", {"prompt": "Act {1}, scene 2"},
     "prompt has characters not in the vocabulary of model 'shakespeare': '{' at 4; "
     "'1' at 5; '}' at 6; '2' at 15"),
    ("/v1/completions", {"prompt": "Act {1}, scene {2}"},
     "prompt has characters not in the vocabulary of model 'shakespeare': '{' at 4, 15; "
     "'1' at 5; '}' at 6, 17; '2' at 16"),
    ("/v1/completions", {"prompt": ["fine", "nope 7"]},
     "prompt[1] has characters not in the vocabulary of model 'shakespeare': '7' at 5"),
    ("/v1/completions", {"prompt": [1, 2, 65, 99]},
     "prompt has token ids outside the vocabulary of model 'shakespeare' (ids 0 to 64, one "
     "per character; GET /tokenizer_info lists them): 65 at 2; 99 at 3"),
    ("/detokenize", {"tokens": [-1]},
     "tokens has token ids outside the vocabulary of model 'shakespeare' (ids 0 to 64, one "
     "per character; GET /tokenizer_info lists them): -1 at 0"),
    ("/score", {"text": "ok", "context": "#"},
     "context has characters not in the vocabulary of model 'shakespeare': '#' at 0"),
])
def test_characters_outside_the_vocabulary_are_named_with_their_positions(
        srv: InProcessServer, path: str, body: dict[str, Any], message: str) -> None:
    r = post(srv, path, body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"] == message


def test_chat_completions_says_why_it_is_not_served(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="shakespeare",
                                       messages=[{"role": "user", "content": "hi"}])
    assert "character-level language models" in str(info.value)
    assert "/v1/completions" in str(info.value)


def test_score_reports_totals_over_the_text_and_not_its_context(srv: InProcessServer) -> None:
    text, context = "To be, or not to be: that is the question", "HAMLET:\n"
    r = post(srv, "/score", {"text": text, "context": context, "top": 3}).json()
    want = stepwise(context + text)[len(context) - 1:]
    assert r["chars"] == len(text) == len(r["logprobs"])
    assert "".join(c["char"] for c in r["logprobs"]) == text
    assert abs(r["total_logprob"] - sum(want)) < 1e-4
    assert r["mean_nats"] == pytest.approx(-r["total_logprob"] / len(text))
    assert r["bits_per_char"] == pytest.approx(r["mean_nats"] / math.log(2))
    assert r["perplexity"] == pytest.approx(math.exp(r["mean_nats"]))
    assert all(len(c["top"]) == 3 for c in r["logprobs"])
    # no context: the primer (a newline) conditions the first character, which is scored
    r = post(srv, "/score", {"text": text}).json()
    assert r["chars"] == len(text)
    assert abs(r["total_logprob"] - sum(stepwise("\n" + text))) < 1e-4


def test_generate_with_n_replies_with_choices_each_reproducible(srv: InProcessServer) -> None:
    body = {"seed_text": "KING:\n", "max_new_chars": 30, "temperature": 1.0, "seed": 21}
    r = post(srv, "/generate", {**body, "n": 3}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    for c in r["choices"]:
        alone = post(srv, "/generate", {**body, "seed": c["seed"]}).json()
        assert alone["text"] == c["text"]
    assert "index" not in post(srv, "/generate", body).json()


def test_best_of_returns_the_choices_with_the_highest_mean_logprob(
        srv: InProcessServer, client: openai.OpenAI) -> None:
    body = {"seed_text": "KING:\n", "max_new_chars": 30, "temperature": 1.5, "seed": 4}
    every = post(srv, "/generate", {**body, "n": 5, "details": True}).json()["choices"]
    means = [sum(math.log(d["prob"]) for d in c["details"]) / 30 for c in every]
    best = post(srv, "/generate", {**body, "n": 2, "best_of": 5}).json()["choices"]
    ranked = sorted(range(5), key=lambda i: -means[i])[:2]
    assert [c["text"] for c in best] == [every[i]["text"] for i in ranked]
    assert [c["logprob_mean"] for c in best] == pytest.approx([means[i] for i in ranked],
                                                              abs=1e-5)
    out = client.completions.create(model="shakespeare", prompt="KING:\n", max_tokens=30,
                                    temperature=1.5, seed=4, best_of=5)
    assert out.choices[0].text == every[ranked[0]]["text"]
    r = post(srv, "/v1/completions", {"prompt": "A", "best_of": 3, "stream": True})
    assert r.status_code == 422
    assert "best_of cannot be streamed" in r.json()["error"]["message"]


def test_top_k_1_is_greedy_whatever_the_seed(client: openai.OpenAI) -> None:
    greedy = client.completions.create(model="shakespeare", prompt="KING:\n", max_tokens=40,
                                       temperature=0).choices[0].text
    for seed in (1, 2):
        out = client.completions.create(model="shakespeare", prompt="KING:\n", max_tokens=40,
                                        temperature=1.0, seed=seed,
                                        extra_body={"top_k": 1})
        assert out.choices[0].text == greedy


def test_min_tokens_keeps_a_stop_string_from_ending_the_text_early(
        srv: InProcessServer) -> None:
    body = {"prompt": "KING:\n", "max_tokens": 60, "temperature": 0, "stop": ["\n"]}
    short = post(srv, "/v1/completions", body).json()["choices"][0]
    assert short["finish_reason"] == "stop"
    longer = post(srv, "/v1/completions", {**body, "min_tokens": len(short["text"]) + 2}
                  ).json()["choices"][0]
    assert longer["text"].startswith(short["text"] + "\n")
    assert len(longer["text"]) > len(short["text"]) + 1


NEUTRAL_VALUES = {"user": "someone", "presence_penalty": 0, "frequency_penalty": 0.0,
                  "best_of": 1, "suffix": None, "logit_bias": {}, "min_p": 0,
                  "repetition_penalty": 1.0, "min_tokens": 0, "top_k": 0}


def test_fields_clients_send_at_their_neutral_values_change_nothing(
        srv: InProcessServer) -> None:
    body = {"prompt": "KING:\n", "max_tokens": 30, "temperature": 1.0, "seed": 8}
    plain = post(srv, "/v1/completions", body).json()["choices"][0]["text"]
    r = post(srv, "/v1/completions", {**body, **NEUTRAL_VALUES, "best_of": None})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain


@pytest.mark.parametrize(("field", "value", "why"), [
    ("presence_penalty", 0.5, "penalise every common letter"),
    ("frequency_penalty", -1.0, "penalise every common letter"),
    ("repetition_penalty", 1.1, "degrades spelling"),
    ("suffix", "xyz", "cannot fill in before a suffix"),
    ("guided_grammar", "root ::= 'a'", "unknown field 'guided_grammar'"),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/generate"])
def test_every_other_value_is_refused_with_the_reason(
        srv: InProcessServer, path: str, field: str, value: Any, why: str) -> None:
    body = {"prompt" if path.startswith("/v1") else "seed_text": "A", field: value}
    r = post(srv, path, body)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    if field == "suffix" and path == "/generate":
        assert "unknown field 'suffix'" in message  # /v1 only
    else:
        assert why in message


def test_n_past_the_servers_bound_is_refused(srv: InProcessServer) -> None:
    r = post(srv, "/v1/completions", {"prompt": "A", "n": 9})
    assert r.status_code == 422
    assert r.json()["error"]["message"] == (
        "n must be at most 8 on this server (CHARLSTM_MAX_N, and CHARLSTM_MAX_BATCH rows), "
        "got 9")


def test_the_readme_table_is_the_field_list_in_code() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme
    assert {f.name for f in FIELDS if f.status == NEUTRAL} <= set(NEUTRAL_VALUES)


def test_openapi_lists_the_new_routes(srv: InProcessServer) -> None:
    paths = httpx.get(f"{srv.url}/openapi.json", timeout=30).json()["paths"]
    assert {"/score", "/tokenize", "/detokenize", "/tokenizer_info"} <= set(paths)
    assert json.dumps(paths["/score"])  # documented
