"""In-process tests of POST /score: continuation log-probabilities, batched."""

from __future__ import annotations

from typing import Any

import pytest
from service_testing import PROMPT

GREEDY = {"temperature": 0.0}


def test_score_sums_continuation_logprobs(client: Any, engine: Any) -> None:
    items = [
        {"prompt": PROMPT, "continuation": " Paris"},
        {"prompt": PROMPT, "continuation": " banana"},
        {"prompt": PROMPT, "continuation": " Paris, the city of light"},
    ]
    r = client.post("/score", json={"items": items})
    assert r.status_code == 200, r.text
    paris, banana, long = r.json()
    assert paris["logprob"] > banana["logprob"]
    assert paris["num_tokens"] == 1
    assert -1.0 < paris["logprob"] < 0.0  # greedy next token (see /generate above)
    n_cont = len(engine.tokenizer.encode(" Paris, the city of light", add_special_tokens=False))
    assert long["num_tokens"] == n_cont == len(long["token_logprobs"])
    assert long["logprob"] == pytest.approx(sum(long["token_logprobs"]))
    assert long["token_logprobs"][0] == pytest.approx(paris["logprob"], abs=1e-4)


def test_score_matches_generation_logprobs(client: Any) -> None:
    r = client.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "logprobs": 1, **GREEDY}
    )
    lp = r.json()["choices"][0]["logprobs"]
    continuation = "".join(lp["tokens"])
    r = client.post("/score", json={"items": [{"prompt": PROMPT, "continuation": continuation}]})
    (score,) = r.json()
    assert score["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-3)


def test_score_tokenizes_prompt_and_continuation_separately(client: Any, engine: Any) -> None:
    # Jointly, "New Y" + "ork" is two tokens ("New", " York"): the boundary token would
    # swallow the prompt's last token and the continuation would not be scored on its own.
    def encode(text: str) -> list[int]:
        return engine.tokenizer.encode(text, add_special_tokens=False)

    assert len(encode("New York")) < len(encode("New Y")) + len(encode("ork"))
    r = client.post("/score", json={"items": [{"prompt": "New Y", "continuation": "ork"}]})
    assert r.json()[0]["num_tokens"] == len(encode("ork"))
    r = client.post(
        "/score", json={"items": [{"prompt": encode("New Y"), "continuation": encode("ork")}]}
    )
    assert r.json()[0]["num_tokens"] == len(encode("ork"))


def test_score_rejects_empty_continuation(client: Any) -> None:
    r = client.post("/score", json={"items": [{"prompt": PROMPT, "continuation": ""}]})
    assert r.status_code == 400
    assert "continuation" in r.text


def test_score_item_the_engine_fails_fails_alone(client: Any, engine: Any) -> None:
    """As /complete: an item the engine fails answers with its error; the batch's other
    items (and callers) get their scores."""
    from vllm_runner import RequestError

    real = engine._collect
    poison = engine.tokenizer.encode("poison")

    async def collect(prompt: list[int], params: Any, *rest: Any) -> Any:
        if list(prompt[-len(poison) - 1 : -1]) == poison:
            raise RequestError("request x failed: injected")
        return await real(prompt, params, *rest)

    engine._collect = collect
    try:
        items = [{"prompt": PROMPT, "continuation": " Paris"},
                 {"prompt": "poison", "continuation": " Paris"}]  # fmt: skip
        r = client.post("/score", json={"items": items})
    finally:
        del engine._collect
    assert r.status_code == 200, r.text
    good, bad = r.json()
    assert good["error"] is None and -1.0 < good["logprob"] < 0.0
    assert bad["logprob"] is None and "injected" in bad["error"]


def test_score_errors_name_the_continuation(client: Any, engine: Any) -> None:
    """A continuation the engine cannot take is refused naming it, not as the prompt (the
    two are checked joined: a continuation's bad token read "prompt token id ...")."""
    from service_testing import MAX_MODEL_LEN

    vocab = engine.inputs.limits.vocab_size
    r = client.post("/score", json={"items": [{"prompt": PROMPT, "continuation": [5, vocab]}]})
    assert r.status_code == 400, r.text
    assert f"continuation token id {vocab} is outside the vocabulary [0, {vocab})" in r.text
    prompt = [5] * (MAX_MODEL_LEN - 3)
    r = client.post("/score", json={"items": [{"prompt": prompt, "continuation": [5] * 4}]})
    assert r.status_code == 400, r.text
    assert f"prompt ({MAX_MODEL_LEN - 3} tokens) + continuation (4 tokens)" in r.text, r.text
    assert f"max_model_len is {MAX_MODEL_LEN}" in r.text


def test_a_continuation_too_long_to_tokenize_is_a_400_naming_it(client: Any, engine: Any) -> None:
    """Refused by its length while the request is parsed (untokenized, a 400 of its own), as
    a long prompt is; not left to the batch's handler."""
    from vllm_runner.serving.batched import PARSE_TIME_CHARS

    text = "y" * (max(engine.inputs.max_prompt_chars, PARSE_TIME_CHARS) + 1)
    r = client.post("/score", json={"items": [{"prompt": PROMPT, "continuation": text}]})
    assert r.status_code == 400, r.text[:300]
    assert f"continuation has {len(text)} characters" in r.text
