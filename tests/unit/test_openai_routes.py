"""The OpenAI routes' answers on a scripted engine (``serving_fakes.FakeEngine``): usage with
n > 1, stream_options, logprobs formats and the /tokenize forms, exact values as OpenAI's API
and vLLM's server give them. Fast: no model, no BentoML."""

from __future__ import annotations

import json
from typing import Any

import pytest
from serving_fakes import OTHER, FakeEngine, update
from starlette.testclient import TestClient

ABC = [{"role": "user", "content": "a b c"}]  # a 3-token prompt for the fake engine


def client_for(engine: FakeEngine) -> TestClient:
    from vllm_runner.serving.openai_api import create_openai_app

    return TestClient(create_openai_app(lambda: engine))


def events(response: Any) -> list[dict]:
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_completion_usage_counts_each_prompt_once_with_n() -> None:
    """vLLM: prompt_tokens is each prompt's length once, however many choices it has;
    completion_tokens every choice's tokens; streamed, the last chunk before [DONE]."""
    client = client_for(FakeEngine())
    body = {"prompt": ["a b c", "d e"], "n": 2, "max_tokens": 2}
    usage = {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    r = client.post("/v1/completions", json=body)
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert r.json()["usage"] == usage
    opts = {"stream": True, "stream_options": {"include_usage": True}}
    *chunks, last = events(client.post("/v1/completions", json={**body, **opts}))
    assert last["choices"] == [] and last["usage"] == usage
    assert all(c["usage"] is None for c in chunks)
    assert sorted(c["choices"][0]["index"] for c in chunks) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_chat_usage_counts_the_prompt_once_with_n() -> None:
    client = client_for(FakeEngine())
    body = {"messages": ABC, "n": 2, "max_tokens": 2}
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    r = client.post("/v1/chat/completions", json=body)
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert r.json()["usage"] == usage
    opts = {"stream": True, "stream_options": {"include_usage": True}}
    *chunks, last = events(client.post("/v1/chat/completions", json={**body, **opts}))
    assert last["choices"] == [] and last["usage"] == usage
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]  # the role chunks first


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_need_include_usage(path: str) -> None:
    """vLLM: continuous usage only with include_usage; include_usage false sends no usage."""
    client = client_for(FakeEngine())
    body = {"prompt": "a b c"} if path == "/v1/completions" else {"messages": ABC}
    opts = {"include_usage": False, "continuous_usage_stats": True}
    body = {**body, "max_tokens": 2, "stream": True, "stream_options": opts}
    chunks = events(client.post(path, json=body))
    assert chunks and all("usage" not in c and c["choices"] for c in chunks)


def test_continuous_usage_counts_each_choices_own_prompt() -> None:
    """vLLM: a content chunk's usage is its choice's so far: its own prompt's tokens."""
    client = client_for(FakeEngine())
    opts = {"include_usage": True, "continuous_usage_stats": True}
    body = {"prompt": ["a b c", "d e"], "max_tokens": 2, "stream": True, "stream_options": opts}
    *chunks, last = events(client.post("/v1/completions", json=body))
    seen = [(c["choices"][0]["index"], c["usage"]) for c in chunks]
    assert sorted(seen, key=lambda s: s[0]) == [
        (0, {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}),
        (0, {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}),
        (1, {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}),
        (1, {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}),
    ]
    assert last == {**last, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4,
                                                     "total_tokens": 9}}  # fmt: skip


def test_models_list() -> None:
    r = client_for(FakeEngine()).get("/v1/models")
    (card,) = r.json()["data"]
    assert r.json() == {"object": "list", "data": [card]}
    assert {k: card[k] for k in ("id", "object", "max_model_len")} == {
        "id": "fake-model",
        "object": "model",
        "max_model_len": 64,
    }


def test_chat_logprobs_are_null_unless_asked() -> None:
    client = client_for(FakeEngine())
    body = {"messages": ABC, "max_tokens": 2}
    (choice,) = client.post("/v1/chat/completions", json=body).json()["choices"]
    assert choice["logprobs"] is None and choice["message"]["content"] == "<10><20>"


def test_logprobs_give_the_sampled_tokens_own_logprob() -> None:
    """The sampled token (-1.0) is not the most likely one (token 7, -0.5): its logprob is
    its own. Chat's top_logprobs are the top_logprobs most likely; the legacy dicts list the
    `logprobs` most likely and the sampled one."""
    client = client_for(FakeEngine())

    def entry(tid: int, lp: float) -> dict:
        name = f"token_id:{tid}"
        return {"token": name, "logprob": lp, "bytes": list(name.encode())}

    body = {"messages": ABC, "max_tokens": 2, "logprobs": True, "top_logprobs": 1}
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={**body, "stream": stream})
        if stream:
            content = [e for c in events(r) if c["choices"][0]["logprobs"]
                       for e in c["choices"][0]["logprobs"]["content"]]  # fmt: skip
        else:
            content = r.json()["choices"][0]["logprobs"]["content"]
        assert content == [
            {**entry(tid, -1.0), "top_logprobs": [entry(OTHER, -0.5)]} for tid in (10, 20)
        ]
    body = {"prompt": "a b c", "max_tokens": 2, "logprobs": 1}
    lp = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert lp == {
        "tokens": ["token_id:10", "token_id:20"],
        "token_logprobs": [-1.0, -1.0],
        "top_logprobs": [{"token_id:7": -0.5, f"token_id:{tid}": -1.0} for tid in (10, 20)],
        "text_offset": [0, 11],
    }


def test_chat_stream_sends_the_logprobs_of_a_token_without_text() -> None:
    """A token that ends no character yet (half of a UTF-8 sequence) has no text: its chunk
    still carries its logprobs (as vLLM's), so the streamed logprobs list every token."""
    updates = [
        update(0, "", [10], 1, logprobs=[{10: -1.0}]),
        update(0, "é", [20], 2, True, logprobs=[{20: -2.0}]),
    ]
    client = client_for(FakeEngine(updates))
    body = {"messages": ABC, "max_tokens": 2, "logprobs": True, "stream": True}
    choices = [c["choices"][0] for c in events(client.post("/v1/chat/completions", json=body))]
    with_lps = [(c["delta"], [e["logprob"] for e in c["logprobs"]["content"]])
                for c in choices if c["logprobs"]]  # fmt: skip
    assert with_lps == [({"content": ""}, [-1.0]), ({"content": "é"}, [-2.0])]
    assert choices[-1]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "chat"),
    [
        ({"prompt": "a b"}, False),  # a prompt gets special tokens by default
        ({"prompt": "a b", "add_special_tokens": False}, True),
        ({"messages": ABC}, True),  # the template holds them
        ({"messages": ABC, "add_special_tokens": True}, False),
        # vLLM's prompt form has no continue_final_message: ignored there
        ({"prompt": "a b", "continue_final_message": True}, False),
    ],
)
def test_tokenize_adds_special_tokens_as_vllm(body: dict, chat: bool) -> None:
    """``chat=True`` is the engine's tokenization without special tokens."""
    engine = FakeEngine()
    r = client_for(engine).post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    ((_, tokenized_as_chat),) = engine.tokenized
    assert tokenized_as_chat == chat


def test_text_offsets_count_characters() -> None:
    """OpenAI's (and vLLM's) text_offset is where each token starts in the text, counted in
    characters, not in UTF-8 bytes; tokens named by id (return_tokens_as_token_ids) still
    start where their text does (vLLM counts their names' characters instead)."""
    from vllm_runner.serving.openai_format import TokenDecoder, completion_logprobs

    names = {1: "é", 2: "t", 3: "☃", 4: "!"}

    class Names(TokenDecoder):
        def __call__(self, tid: int) -> str:
            return names[tid]

    for as_ids in (False, True):
        lp = completion_logprobs(Names(None, as_ids), [*names], [{t: -1.0} for t in names], 5)
        assert lp["text_offset"] == [5, 6, 7, 8]
    assert lp["tokens"] == ["token_id:1", "token_id:2", "token_id:3", "token_id:4"]


def test_the_priority_goes_to_each_prompts_stream() -> None:
    engine = FakeEngine()
    client = client_for(engine)
    body = {"prompt": ["a b", "c"], "max_tokens": 1, "priority": 4}
    assert client.post("/v1/completions", json=body).status_code == 200
    chat = {"messages": ABC, "max_tokens": 1, "priority": -3, "stream": True}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert client.post("/v1/chat/completions", json={**chat, "priority": None}).status_code == 200
    assert engine.priorities == [4, 4, -3, 0]
