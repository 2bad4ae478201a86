"""In-process tests of the OpenAI-compatible routes: shapes, streaming, sampling, errors."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from service_testing import CHAT, MAX_MODEL_LEN, PROMPT, post_scope, receive_then_leave

MODEL = "SmolLM2-135M-Instruct"


def events(response: Any) -> list[Any]:
    """SSE `data:` payloads, JSON-decoded; the last one must be [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = response.text.splitlines()
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_models(client: Any) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    (model,) = r.json()["data"]
    assert model["id"] == MODEL and model["object"] == "model"
    assert model["max_model_len"] == MAX_MODEL_LEN


def test_completion(client: Any) -> None:
    r = client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["text"].startswith(" Paris")
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_completion_many_prompts_and_n(client: Any) -> None:
    ids = [504, 3458, 282, 4649, 314]  # PROMPT's token ids
    for prompts in ([PROMPT, PROMPT], [ids, ids]):
        r = client.post(
            "/v1/completions", json={"prompt": prompts, "n": 2, "max_tokens": 2, "temperature": 0}
        )
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1, 2, 3]
        assert len({c["text"] for c in choices}) == 1  # greedy: all four the same
        assert r.json()["usage"] == {
            "prompt_tokens": 10,
            "completion_tokens": 8,
            "total_tokens": 18,
        }


def test_completion_stop_and_seed(client: Any) -> None:
    r = client.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stop": ["."]}
    )
    (choice,) = r.json()["choices"]
    assert choice["text"] == " Paris" and choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == "."  # which stop string ended it, as vLLM says
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 1234}
    texts = [
        client.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(2)
    ]
    assert texts[0] == texts[1]


def test_completion_logprobs(client: Any) -> None:
    r = client.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "logprobs": 2, "temperature": 0}
    )
    (choice,) = r.json()["choices"]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert all(len(top) == 2 for top in lp["top_logprobs"])
    for token, token_lp, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        assert token_lp == max(top.values()) == top[token]  # greedy: the sampled one is top-1
    assert lp["text_offset"][0] == 0
    # streamed, the offsets run on across chunks as in the response above
    body = {"prompt": PROMPT, "max_tokens": 3, "logprobs": 2, "temperature": 0, "stream": True}
    chunks = [c["choices"][0] for c in events(client.post("/v1/completions", json=body))]
    streamed = [o for c in chunks if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert streamed == lp["text_offset"]


def test_completion_top_logprobs_list_the_sampled_token(client: Any) -> None:
    """As OpenAI's legacy API and vLLM: each top_logprobs dict has the `logprobs` most likely
    tokens and the sampled one, so up to logprobs + 1 entries (logprobs=0: just the sampled)."""
    body = {"prompt": PROMPT, "max_tokens": 3, "logprobs": 0, "temperature": 0}
    lp = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    pairs = zip(lp["tokens"], lp["token_logprobs"], strict=True)
    assert lp["top_logprobs"] == [{t: v} for t, v in pairs]
    body = {"prompt": "Once upon a time", "max_tokens": 24, "logprobs": 1, "temperature": 3.0}
    lp = client.post("/v1/completions", json={**body, "seed": 5}).json()["choices"][0]["logprobs"]
    below_top = 0
    for token, token_lp, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        assert top[token] == token_lp
        assert len(top) == (1 if token_lp == max(top.values()) else 2)
        below_top += len(top) == 2
    assert below_top > 0  # at temperature 3 some sampled tokens were not the most likely


def test_stream_chunks_share_created_and_carry_null_usage(client: Any, monkeypatch: Any) -> None:
    """Every chunk of a stream has the request's `created` (OpenAI: "each chunk has the same
    timestamp"), and with include_usage a `usage` field that is null but in the last."""
    from vllm_runner.serving import openai_format

    clock = iter(range(1_000_000, 2_000_000))
    monkeypatch.setattr(openai_format.time, "time", lambda: next(clock))
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions",
                                                                 {"messages": CHAT})):  # fmt: skip
        body = {**body, "max_tokens": 6, "stream": True, "ignore_eos": True}
        opts = {"stream_options": {"include_usage": True}}
        chunks = events(client.post(path, json={**body, **opts}))
        assert len(chunks) > 3 and len({c["created"] for c in chunks}) == 1, path
        assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"], path
        assert all("usage" not in c for c in events(client.post(path, json=body))), path


def test_continuous_usage_stats(client: Any) -> None:
    """vLLM's stream_options.continuous_usage_stats (was ignored): each content chunk has
    its choice's usage so far, the last chunk the whole request's."""
    opts = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body = {"messages": CHAT, "max_tokens": 5, "stream": True, "ignore_eos": True, **opts}
    chunks = events(client.post("/v1/chat/completions", json=body))
    prompt_tokens = chunks[-1]["usage"]["prompt_tokens"]
    counts = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 5, counts
    assert all(c["usage"]["prompt_tokens"] == prompt_tokens for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 5 and chunks[-1]["choices"] == []
    body = {"prompt": PROMPT, "max_tokens": 4, "stream": True, "ignore_eos": True, **opts}
    chunks = events(client.post("/v1/completions", json=body))
    assert [c["usage"]["completion_tokens"] for c in chunks[:-1]][-1] == 4
    # as vLLM: continuous usage alone implies the final usage chunk; null is the default
    alone = {"stream_options": {"continuous_usage_stats": True, "include_usage": None}}
    chunks = events(client.post("/v1/completions", json={**body, **alone}))
    assert chunks[-1]["usage"]["completion_tokens"] == 4 and chunks[-1]["choices"] == []
    assert all(c["usage"] for c in chunks)


def test_completion_stream(client: Any) -> None:
    body = {
        "prompt": [PROMPT, "Hello"],
        "n": 2,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200
    chunks = events(r)
    *text_chunks, usage_chunk = chunks
    assert {c["choices"][0]["index"] for c in text_chunks} == {0, 1, 2, 3}
    finished = [c["choices"][0] for c in text_chunks if c["choices"][0]["finish_reason"]]
    assert len(finished) == 4
    assert usage_chunk["choices"] == []
    # 4 completions of max_tokens=4; sampling (temperature 1) may end one early at EOS
    lengths = [4 if c["finish_reason"] == "length" else None for c in finished]
    used = usage_chunk["usage"]["completion_tokens"]
    assert used == 16 if None not in lengths else 4 <= used < 16


def test_chat(client: Any) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": CHAT, "max_tokens": 12, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "The capital of France is Paris."}
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None  # EOS
    assert body["usage"]["completion_tokens"] >= 7


def test_chat_text_parts_join_as_lines() -> None:
    """A message given as text parts reads as their lines (vLLM joins them with newlines)."""
    from vllm_runner.serving.protocol import ChatMessage

    parts = [
        {"type": "text", "text": "What is the capital"},
        {"type": "text", "text": "of France?"},
    ]
    message = ChatMessage(role="user", content=parts)
    assert message.as_dict() == {"role": "user", "content": "What is the capital\nof France?"}


def test_chat_content_parts_and_logprobs(client: Any) -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the capital "},
                {"type": "text", "text": "of France?"},
            ],
        },
    ]
    r = client.post(
        "/v1/chat/completions",
        json={
            "messages": messages,
            "max_tokens": 3,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    (choice,) = r.json()["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == 3
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    for entry in content:
        assert len(entry["top_logprobs"]) == 2
        assert entry["logprob"] == entry["top_logprobs"][0]["logprob"]
        assert bytes(entry["bytes"]).decode() == entry["token"]
    assert b"".join(bytes(c["bytes"]) for c in content) == choice["message"]["content"].encode()


def test_chat_stream(client: Any) -> None:
    body = {"messages": CHAT, "max_tokens": 12, "temperature": 0, "stream": True, "n": 2}
    chunks = events(client.post("/v1/chat/completions", json=body))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["delta"].get("content", "") for c in mine)
        assert text == "The capital of France is Paris."
        assert mine[-1]["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_reason_names_the_stop_string_or_token(client: Any, engine: Any, stream: bool) -> None:
    """As vLLM: each choice's stop_reason is the stop string or stop token id that ended it
    (null for EOS, a length limit, and chunks before the last), streamed or not."""
    paris = engine.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    cases = [
        ("/v1/completions", {"prompt": PROMPT, "stop": [" of", "."]}, "."),
        ("/v1/completions", {"prompt": PROMPT, "stop_token_ids": [paris]}, paris),
        ("/v1/chat/completions", {"messages": CHAT, "stop": ["."]}, "."),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 1}, None),  # length
    ]
    for path, fields, reason in cases:
        body = {"max_tokens": 12, "temperature": 0, "stream": stream, **fields}
        r = client.post(path, json=body)
        if stream:
            choices = [c["choices"][0] for c in events(r)]
            *running, last = choices
            assert all(c["stop_reason"] is None for c in running)
        else:
            (last,) = r.json()["choices"]
        assert last["finish_reason"] == ("length" if reason is None else "stop"), (path, last)
        assert last["stop_reason"] == reason, (path, fields, last)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_max_tokens_past_max_model_len_is_a_400(client: Any, path: str) -> None:
    """As vLLM's server: prompt + max_tokens over max_model_len is refused, not cut short."""
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": CHAT}
    r = client.post(path, json={**body, "max_tokens": 1000})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert f"max_model_len is {MAX_MODEL_LEN} tokens" in message and "max_tokens 1000" in message
    assert r.json()["error"]["param"] == "max_tokens"
    assert client.post(path, json={**body, "max_tokens": 8}).status_code == 200


def test_malformed_json_is_a_400(client: Any) -> None:
    r = client.post(
        "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"].startswith("the body is not valid JSON (character 1)"), error
    assert error["param"] is None  # the position is not a field


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_over_max_model_len(client: Any, path: str) -> None:
    text = "hello " * (MAX_MODEL_LEN + 10)
    body = (
        {"prompt": text}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": text}]}
    )
    r = client.post(path, json={**body, "stream": True})
    assert r.status_code == 400
    error = r.json()["error"]
    assert f"max_model_len is {MAX_MODEL_LEN}" in error["message"]
    assert "prompt has" in error["message"]
    assert error["param"] == ("prompt" if path == "/v1/completions" else "messages")


def test_unknown_model_is_a_404(client: Any) -> None:
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": CHAT})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


def test_retrieve_model(client: Any) -> None:
    """GET /v1/models/{id} (the openai client's models.retrieve): the card, or a 404 in
    OpenAI's shape."""
    listed = client.get("/v1/models").json()["data"][0]
    r = client.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200
    assert {k: v for k, v in r.json().items() if k != "created"} == {
        k: v for k, v in listed.items() if k != "created"
    }
    r = client.get("/v1/models/gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_wrong_method_is_an_openai_405(client: Any) -> None:
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_engine_failure_of_one_request(client: Any, engine: Any) -> None:
    """A request the engine fails gets a 500 (or an in-band error event); the next one works."""
    from vllm_runner import RequestError

    async def failing_stream(*args: Any, **kwargs: Any) -> Any:
        raise RequestError("request x failed: injected")
        yield  # an async generator

    engine.stream = failing_stream
    try:
        r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2})
        assert r.status_code == 500
        assert "injected" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": PROMPT, "stream": True})
        payloads = events(r)
        assert "injected" in payloads[-1]["error"]["message"]
    finally:
        del engine.stream
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2})
    assert r.status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_client_that_leaves_aborts_its_completion(client: Any, engine: Any, path: str) -> None:
    """Not streamed either: a disconnect mid-generation aborts the engine request (as vLLM's
    server does) instead of generating for nobody while holding KV blocks."""
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": CHAT}
    raw = json.dumps({**body, "max_tokens": 200, "ignore_eos": True, "temperature": 0}).encode()
    scope = post_scope(path)
    sent: list[dict] = []

    async def leave_mid_generation() -> None:
        left = asyncio.Event()
        receive = receive_then_leave(raw, left)

        async def send(message: dict) -> None:
            sent.append(message)

        call = asyncio.ensure_future(client.app(scope, receive, send))
        for _ in range(6000):  # until it generates (a liveness bound, not a timing)
            if engine.stats()["num_running"] or call.done():
                break
            await asyncio.sleep(0.01)
        left.set()
        await call

    client.portal.call(leave_mid_generation)
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
    for _ in range(500):
        stats = engine.stats()
        if (stats["num_running"], stats["kv_blocks_used"]) == (0, 0):
            break
        time.sleep(0.01)
    assert (stats["num_running"], stats["kv_blocks_used"]) == (0, 0), stats
