"""In-process tests of vLLM's prompt_logprobs on the OpenAI routes: the prompt tokens' logprobs,
ranks and top-k as HF transformers computes them on the same model, in vLLM's shape
(completions: each choice's; chat: the response's), and their interplay with echo."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from service_testing import CHAT, PROMPT


@pytest.fixture(scope="module")
def hf_logprobs() -> Any:
    """``ids`` -> HF transformers' log-softmax at each position (float32, as the service)."""
    from transformers import AutoModelForCausalLM

    from vllm_runner.model.default_model import default_model_path

    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:  # [len(ids) - 1, vocab]: position p predicts p + 1
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)

    return run


def check_against_hf(field: list, ids: list[int], hf: torch.Tensor, k: int, engine: Any) -> None:
    """``field`` holds, per prompt token after the first, the token and HF's top ``k`` with
    HF's logprobs, the top k ranked 1..k and the token by how many tokens are at least as
    likely (within the two implementations' float32 difference), each with its text."""
    assert field[0] is None and len(field) == len(ids)
    for p, (token, entry) in enumerate(zip(ids[1:], field[1:], strict=True)):
        want = hf[p]
        top = want.topk(k).indices.tolist() if k else []
        assert list(entry) == [str(t) for t in [token, *(t for t in top if t != token)]], p
        for tid, got in entry.items():
            assert got["logprob"] == pytest.approx(want[int(tid)].item(), abs=2e-3), (p, tid)
            assert got["decoded_token"] == engine.tokenizer.decode([int(tid)])
        assert [entry[str(t)]["rank"] for t in top] == list(range(1, k + 1))
        own, rank = want[token].item(), entry[str(token)]["rank"]
        assert (want > own + 2e-3).sum().item() < rank <= (want >= own - 2e-3).sum().item(), p


def test_completion_prompt_logprobs_are_the_models(client: Any, engine: Any, hf_logprobs) -> None:
    ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 2}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    check_against_hf(choice["prompt_logprobs"], ids, hf_logprobs(ids), 2, engine)
    # the engine's own scoring of the same tokens (POST /score) gives the same values
    head, tail = ids[:2], ids[2:]
    (score,) = client.post(
        "/score", json={"items": [{"prompt": head, "continuation": tail}]}
    ).json()
    field = choice["prompt_logprobs"][2:]
    got = [entry[str(t)]["logprob"] for t, entry in zip(tail, field, strict=True)]
    assert got == pytest.approx(score["token_logprobs"], abs=1e-5)


def test_chat_prompt_logprobs_score_the_templated_conversation(
    client: Any, engine: Any, hf_logprobs
) -> None:
    body = {"messages": CHAT, "max_tokens": 1, "n": 2, "prompt_logprobs": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    text = engine.apply_chat_template(CHAT)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    check_against_hf(r.json()["prompt_logprobs"], ids, hf_logprobs(ids), 0, engine)
    assert all(set(c) == {"index", "message", "logprobs", "finish_reason", "stop_reason"}
               for c in r.json()["choices"])  # fmt: skip


def test_every_choice_of_every_prompt_carries_its_prompts_list(client: Any, engine: Any) -> None:
    prompts = [PROMPT, "Once upon a time"]
    body = {"prompt": prompts, "n": 2, "max_tokens": 2, "prompt_logprobs": 3, "seed": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        first, second = (choices[2 * p + i]["prompt_logprobs"] for i in (0, 1))
        assert first == second and first[0] is None and len(first) == len(ids)
        for token, entry in zip(ids[1:], first[1:], strict=True):
            # the token and the top 3, the token among them or not
            assert len(entry) == (3 if entry[str(token)]["rank"] <= 3 else 4)
            assert list(entry)[0] == str(token)


def test_echo_is_unchanged_by_prompt_logprobs(client: Any, engine: Any) -> None:
    """One prefill scores the prompt for both: echo's logprobs keep their own top-k."""
    body = {"prompt": PROMPT, "echo": True, "max_tokens": 2, "temperature": 0, "logprobs": 1}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    (choice,) = client.post("/v1/completions", json={**body, "prompt_logprobs": 4}).json()[
        "choices"
    ]
    assert {k: v for k, v in choice.items() if k != "prompt_logprobs"} == plain
    ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    field = choice["prompt_logprobs"]
    assert len(field) == len(ids) and field[0] is None
    echoed = choice["logprobs"]["token_logprobs"]
    for p, (token, entry) in enumerate(zip(ids[1:], field[1:], strict=True), start=1):
        assert len(entry) in (4, 5) and entry[str(token)]["logprob"] == echoed[p]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": -1},
         "prompt_logprobs: Input should be greater than or equal to 0, got -1"),
        ("/v1/chat/completions", {"messages": CHAT, "prompt_logprobs": 21},
         "prompt_logprobs: Input should be less than or equal to 20, got 21"),
        ("/v1/chat/completions", {"messages": CHAT, "prompt_logprobs": 0, "stream": True},
         "prompt_logprobs are not available with stream: true (as in vLLM), got 0"),
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 1, "use_beam_search": True},
         "prompt_logprobs cannot be combined with use_beam_search, got 1 (beam search takes n, "
         "max_tokens, ignore_eos, length_penalty and temperature 0)"),
    ],
)  # fmt: skip
def test_refused_prompt_logprobs(client: Any, path: str, body: dict, message: str) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == message
    assert r.json()["error"]["param"] == "prompt_logprobs"
