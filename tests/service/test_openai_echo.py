"""In-process tests of `echo` on POST /v1/completions (OpenAI's legacy API, vLLM's server):
the prompt's text and logprobs before the completion's; max_tokens 0 answers the prompt alone,
as lm-evaluation-harness's `local-completions` scores loglikelihoods."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from service_testing import PROMPT

CONTINUATION = " Paris"
# what lm-evaluation-harness's local-completions sends to score a (context, continuation)
LM_EVAL = {"echo": True, "max_tokens": 0, "logprobs": 1, "temperature": 0}


def events(response: Any) -> list[Any]:
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def encode(engine: Any, text: str) -> list[int]:
    return engine.tokenizer.encode(text, add_special_tokens=False)


def check_offsets(lp: dict[str, Any], text: str) -> None:
    """Each token starts at its text_offset in ``text``, one after another."""
    assert lp["text_offset"][0] == 0
    for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
        assert text[offset : offset + len(token)] == token, (token, offset)
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]


def test_lm_eval_loglikelihood_request(client: Any, engine: Any) -> None:
    prompt = PROMPT + CONTINUATION
    r = client.post("/v1/completions", json={"prompt": prompt, **LM_EVAL})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    ids = encode(engine, prompt)
    assert r.json()["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 0,
        "total_tokens": len(ids),
    }
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
    assert "".join(lp["tokens"]) == prompt
    check_offsets(lp, choice["text"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for token, token_lp, top in zip(
        lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True
    ):
        assert token_lp < 0 and top[token] == token_lp
        assert 1 <= len(top) <= 2  # the top-1 and the prompt's own token
    # " Paris" after the prompt is the greedy choice: its own token is the top one
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())


def test_echoed_logprobs_equal_score_and_hf(client: Any, engine: Any) -> None:
    ids = encode(engine, PROMPT) + encode(engine, CONTINUATION)
    r = client.post("/v1/completions", json={"prompt": ids, **LM_EVAL, "logprobs": 0})
    assert r.status_code == 200, r.text
    echoed = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    r = client.post("/score", json={"items": [{"prompt": PROMPT, "continuation": CONTINUATION}]})
    (score,) = r.json()
    k = score["num_tokens"]
    assert echoed[-k:] == pytest.approx(score["token_logprobs"], abs=1e-5)
    # and HF transformers' log-softmax on the same model (float32, as the service runs it)
    from transformers import AutoModelForCausalLM

    from vllm_runner.model.default_model import default_model_path

    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids])).logits[0].float()
    hf = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert echoed[1:] == pytest.approx(hf.tolist(), abs=2e-3)


def test_echo_with_generation_streamed_and_whole_agree(client: Any) -> None:
    body = {"prompt": PROMPT, "echo": True, "max_tokens": 3, "temperature": 0, "logprobs": 2}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    plain = client.post("/v1/completions", json={**body, "echo": False}).json()["choices"][0]
    assert choice["text"] == PROMPT + plain["text"] and r.json()["usage"]["completion_tokens"] == 3
    lp = choice["logprobs"]
    check_offsets(lp, choice["text"])
    n = len(lp["tokens"]) - 3
    assert lp["tokens"][n:] == plain["logprobs"]["tokens"]
    assert lp["token_logprobs"][n:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-4)
    assert [o - len(PROMPT) for o in lp["text_offset"][n:]] == plain["logprobs"]["text_offset"]

    chunks = [
        c["choices"][0]
        for c in events(client.post("/v1/completions", json={**body, "stream": True}))
    ]
    assert chunks[0]["text"].startswith(PROMPT)
    assert "".join(c["text"] for c in chunks) == choice["text"]
    streamed = {key: [x for c in chunks if c["logprobs"] for x in c["logprobs"][key]] for key in lp}
    assert streamed["tokens"] == lp["tokens"] and streamed["text_offset"] == lp["text_offset"]
    assert streamed["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)
    assert chunks[-1]["finish_reason"] == "length"


def test_echo_alone_streamed(client: Any) -> None:
    body = {"prompt": PROMPT, **LM_EVAL, "stream": True}
    chunks = [c["choices"][0] for c in events(client.post("/v1/completions", json=body))]
    assert "".join(c["text"] for c in chunks) == PROMPT
    assert chunks[-1]["finish_reason"] == "length"
    whole = client.post("/v1/completions", json={**body, "stream": False}).json()
    lp = [c["logprobs"] for c in chunks if c["logprobs"]]
    assert len(lp) == 1 and lp[0]["tokens"] == whole["choices"][0]["logprobs"]["tokens"]
    # a one-token prompt: its one token has no logprob (nothing precedes it)
    for stream in (False, True):
        r = client.post("/v1/completions", json={**body, "prompt": "Hello", "stream": stream})
        lp = (events(r)[0] if stream else r.json())["choices"][0]["logprobs"]
        assert lp == {
            "tokens": ["Hello"],
            "token_logprobs": [None],
            "top_logprobs": [None],
            "text_offset": [0],
        }
    # without logprobs the choices carry none
    r = client.post("/v1/completions", json={"prompt": PROMPT, "echo": True, "max_tokens": 0})
    assert r.json()["choices"][0]["logprobs"] is None and r.json()["choices"][0]["text"] == PROMPT


def test_every_choice_of_every_prompt_echoes(client: Any, engine: Any) -> None:
    prompts = [encode(engine, PROMPT), encode(engine, "Once upon a time")]
    body = {"prompt": prompts, "echo": True, "n": 2, "max_tokens": 2, "logprobs": 0}
    r = client.post("/v1/completions", json={**body, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c in choices:
        prompt = [PROMPT, "Once upon a time"][c["index"] // 2]
        assert c["text"].startswith(prompt) and len(c["text"]) > len(prompt)
        assert c["logprobs"]["token_logprobs"][0] is None
        check_offsets(c["logprobs"], c["text"])
    stream = events(client.post("/v1/completions", json={**body, "stream": True, "seed": 1}))
    texts: dict[int, str] = {}
    for chunk in stream:
        (c,) = chunk["choices"]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert sorted(texts) == [0, 1, 2, 3]
    assert all(texts[i].startswith([PROMPT, "Once upon a time"][i // 2]) for i in texts)


def test_max_tokens_zero_needs_echo(client: Any) -> None:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "max_tokens" and ">= 1" in error["message"], error
    body = {"prompt": PROMPT, "max_tokens": 0, "echo": True, "min_tokens": 1}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
    )
    assert r.status_code == 400, r.text
