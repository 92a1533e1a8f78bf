"""lm-evaluation-harness 0.4.13 against the service, as a user runs it: its own
`local-completions` model class with its remote tokenizer (vLLM's /tokenizer_info, /tokenize,
/detokenize) and token-id prompts (its default tokenized_requests), batch_size 4, on three
small local tasks built from held-out Shakespeare (tests/data/lm_eval), offline. Its
loglikelihoods must equal the step graph run one character at a time."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, InProcessServer
from tests.stepwise import stepwise

pytestmark = pytest.mark.slow  # lm-evaluation-harness against a real server process

MODEL_DIR = ROOT / "models" / "shakespeare"
TASKS = ["charlstm_mc", "charlstm_rolling", "charlstm_gen"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    models = tmp_path_factory.mktemp("lm_eval") / "models"
    shutil.copytree(MODEL_DIR, models / "shakespeare")
    server = InProcessServer(models, default="shakespeare", max_batch=32)
    yield server
    server.stop()


def evaluate(srv: InProcessServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
             ) -> dict[str, Any]:
    # No hub at test time: datasets reads the local JSONL with its packaged json builder.
    for var, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                       "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"
                       }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.chdir(ROOT)  # the tasks' data_files are relative to the repository root
    import lm_eval
    from lm_eval.tasks import TaskManager

    primer = httpx.get(f"{srv.url}/tokenizer_info", timeout=30).json()["primer_token_id"]
    results: dict[str, Any] = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": "shakespeare", "base_url": f"{srv.url}/v1/completions",
                    "tokenizer_backend": "remote", "custom_prefix_token_id": primer},
        tasks=TASKS, batch_size=4, log_samples=True,
        task_manager=TaskManager(include_path=str(ROOT / "tests" / "data" / "lm_eval")))
    return results


def test_lm_eval_local_completions_scores_like_a_step_by_step_computation(
        srv: InProcessServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    results = evaluate(srv, monkeypatch, tmp_path)
    samples = results["samples"]

    # multiple_choice: each ending's loglikelihood given its context (not scored itself)
    assert len(samples["charlstm_mc"]) == 8
    for s in samples["charlstm_mc"]:
        for (context, ending), (ll, _greedy) in zip(s["arguments"], s["filtered_resps"],
                                                    strict=True):
            want = sum(stepwise(MODEL_DIR, context + ending)[len(context) - 1:])
            assert abs(ll - want) < 1e-4, (context, ending, ll, want)

    # loglikelihood_rolling: the whole passage, its first character given the primer
    assert len(samples["charlstm_rolling"]) == 4
    for s in samples["charlstm_rolling"]:
        (text,) = s["arguments"][0]
        want = sum(stepwise(MODEL_DIR, "\n" + text))
        assert abs(s["filtered_resps"][0] - want) < 1e-4
    bpb = results["results"]["charlstm_rolling"]["bits_per_byte,none"]
    assert 1.5 < bpb < 3.0  # the model's held-out figure is 2.17 bits per character

    # generate_until: exactly the greedy continuation up to the stop string
    for s in samples["charlstm_gen"]:
        context, kwargs = s["arguments"][0]
        native = httpx.post(f"{srv.url}/generate", json={
            "seed_text": context, "temperature": 0, "stop": kwargs["until"],
            "max_new_chars": kwargs["max_gen_toks"]}, timeout=60).json()
        assert s["filtered_resps"][0] == native["text"]


def test_lm_eval_without_a_prefix_token_is_told_what_to_pass(srv: InProcessServer) -> None:
    """lm-eval sends null as the prefix token of a rolling window when the tokenizer has no
    BOS or EOS: the 422 says which model argument to add."""
    r = httpx.post(f"{srv.url}/v1/completions", json={
        "model": "shakespeare", "prompt": [[None, 5, 6]], "max_tokens": 1, "echo": True,
        "logprobs": 1, "temperature": 0, "seed": 1234}, timeout=30)
    assert r.status_code == 422
    assert "custom_prefix_token_id" in r.json()["error"]["message"]
