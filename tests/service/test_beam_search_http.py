"""vLLM's ``use_beam_search`` on both OpenAI routes: ``n`` beams, the ``n`` best sequences
as the choices (the same as ``LLM.beam_search`` on the same weights), and the settings beam
search does not take refused with the field named."""

from typing import Any

import pytest
from service_testing import PROMPT

from vllm_runner import BeamSearchParams

ASK = [{"role": "user", "content": "Name a fruit."}]


def _texts(llm, prompt_ids: list[int], params: BeamSearchParams) -> list[tuple[str, str]]:
    tok = llm.get_tokenizer()
    (out,) = llm.beam_search([prompt_ids], params)
    ends = llm.engine.eos_ids
    shown = [
        s.output_token_ids[:-1] if s.output_token_ids[-1] in ends else s.output_token_ids
        for s in out.sequences
    ]
    return [(tok.decode(t, skip_special_tokens=True), s.finish_reason)
            for t, s in zip(shown, out.sequences, strict=True)]  # fmt: skip


def test_completions_answer_the_best_beams(client: Any, smol_llm) -> None:
    body = {"prompt": PROMPT, "n": 3, "max_tokens": 6, "use_beam_search": True,
            "ignore_eos": True, "length_penalty": 0.5, "temperature": 0}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    ids = smol_llm.get_tokenizer().encode(PROMPT)
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True, length_penalty=0.5)
    assert [(c["text"], c["finish_reason"]) for c in data["choices"]] == _texts(
        smol_llm, ids, params
    )
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert data["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 18,
                             "total_tokens": len(ids) + 18}  # fmt: skip


def test_two_prompts_get_n_choices_each(client: Any) -> None:
    body = {"prompt": [PROMPT, "Once upon a time"], "n": 2, "max_tokens": 4,
            "use_beam_search": True}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert all(c["text"] and c["logprobs"] is None for c in choices)


def test_chat_answers_the_best_beams(client: Any, smol_llm) -> None:
    body = {
        "messages": ASK,
        "n": 2,
        "max_tokens": 8,
        "use_beam_search": True,
        "seed": 7,
        "top_p": 1.0,
        "logprobs": False,
        "stop": None,
    }  # (a seed, and fields at defaults)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    ids = smol_llm.engine.inputs.tokenize(smol_llm.apply_chat_template(ASK), chat=True)
    want = _texts(smol_llm, ids, BeamSearchParams(beam_width=2, max_tokens=8))
    got = [(c["message"]["content"], c["finish_reason"]) for c in r.json()["choices"]]
    assert got == want and all(c["message"]["role"] == "assistant" for c in r.json()["choices"])


@pytest.mark.parametrize(
    ("route", "fields", "param", "says"),
    [
        ("/v1/completions", {"stream": True}, "stream", "stream cannot be combined"),
        ("/v1/completions", {"logprobs": 2}, "logprobs", "logprobs cannot be combined"),
        ("/v1/completions", {"top_p": 0.5}, "top_p", "top_p cannot be combined"),
        ("/v1/completions", {"stop": ["."]}, "stop", "stop cannot be combined"),
        (
            "/v1/completions",
            {"n": 11},
            "n",
            "n (the number of beams with use_beam_search) must be <= 10, got 11",
        ),  # fmt: skip
        (
            "/v1/completions",
            {"temperature": 0.7},
            "temperature",
            "temperature must be 0 for beam search",
        ),  # fmt: skip
        ("/v1/completions", {"length_penalty": "nan"}, "length_penalty", "finite number"),
        ("/v1/chat/completions", {"logprobs": True}, "logprobs", "logprobs cannot be combined"),
        (
            "/v1/chat/completions",
            {"max_tokens": 300},
            "max_tokens",
            "maximum context length is 256 tokens. max_tokens 300 does not fit",
        ),  # fmt: skip
    ],
)
def test_what_beam_search_does_not_take_is_refused(client, route, fields, param, says) -> None:
    base = {"prompt": PROMPT} if route == "/v1/completions" else {"messages": ASK}
    body = {**base, "use_beam_search": True, "max_tokens": 4, **fields}
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["param"] == param, error
