"""In-process tests of the OpenAI routes' request fields: nulls, vLLM's extensions, fields
refused by name, inputs a template or tokenizer cannot take."""

from __future__ import annotations

import json
from typing import Any

import pytest
from service_testing import CHAT, PROMPT


def test_openai_nulls_mean_the_defaults(client: Any) -> None:
    """The openai client sends null for every None argument: as vLLM, null is the default."""
    nulls = dict.fromkeys(("temperature", "top_p", "n", "stream", "presence_penalty",
                           "frequency_penalty", "top_k", "min_p", "logprobs", "seed", "stop",
                           "repetition_penalty", "ignore_eos", "min_tokens"))  # fmt: skip
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions",
                                                                 {"messages": CHAT})):  # fmt: skip
        r = client.post(path, json={**body, **nulls, "max_tokens": 2})
        assert r.status_code == 200, (path, r.text)
        assert len(r.json()["choices"]) == 1


def test_logit_bias_and_stop_options(client: Any, engine: Any) -> None:
    """logit_bias moves greedy decoding as vLLM's does; include_stop_str_in_output and
    skip_special_tokens reach the engine (they were ignored)."""

    def first(**extra: Any) -> tuple[str, list[int]]:
        body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 1, **extra}
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
        return choice["text"], choice["logprobs"]["tokens"]

    greedy, _ = first()
    (greedy_id,) = engine.tokenizer.encode(greedy, add_special_tokens=False)
    other_id = engine.tokenizer.encode(" London", add_special_tokens=False)[0]
    assert first(logit_bias={str(greedy_id): -100})[0] != greedy
    assert first(logit_bias={str(other_id): 100})[0] == engine.tokenizer.decode([other_id])
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stop": ["."]}
    r = client.post("/v1/completions", json={**body, "include_stop_str_in_output": True})
    assert r.json()["choices"][0]["text"].endswith(".")
    assert not client.post("/v1/completions", json=body).json()["choices"][0]["text"].endswith(".")


def test_a_chat_template_that_raises_is_a_400(client: Any, engine: Any) -> None:
    """Templates refuse some conversations (Gemma, Mistral: no system role): a 400 naming
    the messages, as vLLM, not a 500."""
    from jinja2 import TemplateError

    def strict(messages: list[dict], **options: bool) -> str:
        raise TemplateError("System role not supported")

    engine.apply_chat_template = strict
    try:
        r = client.post("/v1/chat/completions", json={"messages": CHAT})
    finally:
        del engine.apply_chat_template
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"
    assert "System role not supported" in r.json()["error"]["message"]


def test_lone_surrogates_are_a_400(client: Any) -> None:
    """JSON may escape a lone surrogate ("\\ud800"), which is no Unicode text: a 400 naming
    the field (it was a 500 from the tokenizer), and a 404 that can show the model name."""
    headers = {"Content-Type": "application/json"}
    for path, raw, params in (
        ("/v1/completions", b'{"prompt": "hi \\ud800"}', ("prompt",)),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
         ("messages",)),  # the templated prompt is no request field
    ):  # fmt: skip
        r = client.post(path, content=raw, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] in params, r.text
    raw = b'{"model": "x\\ud800", "messages": [{"role": "user", "content": "hi"}]}'
    r = client.post("/v1/chat/completions", content=raw, headers=headers)
    assert r.status_code == 404 and "x\\ud800" in r.json()["error"]["message"]


def test_chat_template_options(client: Any, engine: Any) -> None:
    """vLLM's add_generation_prompt / continue_final_message shape the templated prompt
    (they were ignored): without the assistant header, or continuing the last message."""
    tokenizer = engine.tokenizer

    def prompt_tokens(messages: list[dict], **options: Any) -> int:
        body = {"messages": messages, "max_tokens": 1, **options}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    def expected(messages: list[dict], **options: Any) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
        return len(tokenizer.encode(text, add_special_tokens=False))

    assert prompt_tokens(CHAT) == expected(CHAT, add_generation_prompt=True)
    bare = prompt_tokens(CHAT, add_generation_prompt=False)
    assert bare == expected(CHAT, add_generation_prompt=False) < prompt_tokens(CHAT)
    started = [*CHAT, {"role": "assistant", "content": "The capital"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    assert prompt_tokens(started, **options) == expected(started, **options)
    body = {"messages": started, "max_tokens": 8, "temperature": 0, **options}
    text = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert text["content"].startswith(" of France")  # the message goes on, no new turn


def test_message_names_and_tool_calls_reach_the_template() -> None:
    """(Tool calls over HTTP: test_tool_calls_http.py.)"""
    from vllm_runner.serving.protocol import ChatMessage

    named = ChatMessage(role="user", content="hi", name="ann")
    assert named.as_dict() == {"role": "user", "content": "hi", "name": "ann"}
    assert ChatMessage(role="user", content="hi").as_dict() == {"role": "user", "content": "hi"}
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    assert ChatMessage(role="assistant", tool_calls=[call]).as_dict() == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{**call, "function": {"name": "f", "arguments": {"x": 1}}}],
    }
    answer = ChatMessage(role="tool", content="42", tool_call_id="c1").as_dict()
    assert answer == {"role": "tool", "content": "42", "tool_call_id": "c1"}


def test_logprob_tokens_keep_sentencepiece_spaces() -> None:
    """A SentencePiece (Metaspace) token decoded alone loses its leading space (Llama 2,
    Mistral): logprob tokens must read as in the text, so text_offset and bytes add up."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vllm_runner.serving import openai_format as fmt

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁The": 3, "▁capital": 4, "▁is": 5, "▁Paris": 6,
             ".": 7, "▁a": 8}  # fmt: skip
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    assert tokenizer.decode([5]) == "is"  # the decoder strips a lone token's space
    ids = [5, 6, 7]  # " is Paris." after "The capital"
    text = tokenizer.decode([3, 4, *ids])[len(tokenizer.decode([3, 4])) :]
    decode = fmt.TokenDecoder(tokenizer)
    lp = fmt.completion_logprobs(decode, ids, [{i: -0.5} for i in ids])
    assert lp["tokens"] == [" is", " Paris", "."] and "".join(lp["tokens"]) == text
    assert lp["text_offset"] == [0, 3, 9]
    (first, *_) = fmt.chat_logprobs(decode, ids, [{i: -0.5} for i in ids], 0)["content"]
    assert first["token"] == " is" and bytes(first["bytes"]) == b" is"


def test_prompts_are_tokenized_off_the_event_loop(client: Any, engine: Any) -> None:
    """Tokenizing a long prompt takes seconds: on the event loop it held every other stream
    and the health probes of the worker (found under load). Each streaming route tokenizes
    in a thread."""
    import asyncio

    threads: list[bool] = []
    original = engine.validate

    def recording(prompt: Any, params: Any, chat: bool = False, **kw: Any) -> list[int]:
        if isinstance(prompt, str):  # (token ids are checked again where they are queued)
            try:
                asyncio.get_running_loop()
                threads.append(False)  # tokenized on the event loop
            except RuntimeError:
                threads.append(True)
        return original(prompt, params, chat, **kw)

    engine.validate = recording
    try:
        for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions",
                          {"messages": CHAT}), ("/generate", {"prompt": PROMPT})):  # fmt: skip
            r = client.post(path, json={**body, "max_tokens": 2})
            assert r.status_code == 200, (path, r.text)
    finally:
        del engine.validate
    assert threads == [True, True, True]


def test_text_too_long_for_max_model_len_is_refused_untokenized(client: Any, engine: Any) -> None:
    """More characters than max_model_len tokens can hold: a 400 without tokenizing."""
    from service_testing import MAX_MODEL_LEN

    from vllm_runner.tokenizer import max_text_chars

    limit = engine.inputs.max_prompt_chars
    assert limit == max_text_chars(engine.tokenizer, MAX_MODEL_LEN)
    text = "x" * (limit + 1)
    calls = []
    encode = engine.tokenizer.encode
    engine.tokenizer.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    try:
        for path, body, param in (
            ("/v1/completions", {"prompt": text}, "prompt"),
            ("/generate", {"prompt": text}, None),
            ("/score", {"items": [{"prompt": "hi", "continuation": text}]}, None),
        ):
            r = client.post(path, json=body)
            assert r.status_code == 400, (path, r.text)
            assert f"has {limit + 1} characters, more than max_model_len" in r.text, r.text
            assert f"at most {limit}" in r.text
            if param:
                assert r.json()["error"]["param"] == param
    finally:
        del engine.tokenizer.encode
    assert calls == []  # /score's long item: both texts' lengths checked before tokenizing
    engine.inputs.check_text_length("x" * limit, "prompt")  # (at the bound: not over it)
    # characters the tokenizer drops (six control characters SmolLM2 has no piece for)
    # do not count: such a text is tokenized, not refused by the bound
    dropped = engine.inputs.uncounted
    assert dropped and len(engine.tokenizer.encode(dropped, add_special_tokens=False)) == 0
    engine.inputs.check_text_length(dropped[0] * (limit + 10) + "hi", "prompt")
    engine.inputs.check_text_length(dropped[0] * (4 * limit), "prompt")
    with pytest.raises(ValueError, match="more than max_model_len"):  # but not without end
        engine.inputs.check_text_length(dropped[0] * (4 * limit + 1), "prompt")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": PROMPT, "temperature": -1}, "temperature"),
        ("/v1/completions", {"prompt": PROMPT, "top_p": 1.5}, "top_p"),
        ("/v1/completions", {"prompt": PROMPT, "n": 0}, "n"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": -3}, "max_tokens"),
        ("/v1/completions", {"prompt": PROMPT, "logprobs": 50}, "logprobs"),
        ("/v1/completions", {"prompt": PROMPT, "top_k": 2**63}, "top_k"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        (
            "/v1/completions",
            {"prompt": PROMPT, "stream_options": {"include_usage": True}},
            "stream_options",
        ),  # fmt: skip
        ("/v1/completions", {"prompt": PROMPT, "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": CHAT, "presence_penalty": 3}, "presence_penalty"),
        # fields that change the output and are not implemented are refused, not ignored
        ("/v1/completions", {"prompt": PROMPT, "suffix": "!"}, "suffix"),
        ("/v1/completions", {"prompt": PROMPT, "best_of": 3}, "best_of"),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "response_format": {"type": "json_schema"}},
            "response_format",
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools",
        ),
        ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
        ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"999999": 1}}, "logit_bias"),
        # vLLM's own request fields that change the output, at values other than unused
        ("/v1/completions", {"prompt": PROMPT, "allowed_token_ids": []}, "allowed_token_ids"),
        ("/v1/completions", {"prompt": PROMPT, "bad_words": [" "]}, "bad_words"),
        ("/v1/completions", {"prompt": PROMPT, "bad_words": [""]}, "bad_words"),
        ("/v1/completions", {"prompt": PROMPT, "bad_words": "Paris"}, "bad_words"),
        ("/v1/completions", {"prompt": PROMPT, "bad_words": ["x"] * 65}, "bad_words"),
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs"),
        (
            "/v1/completions",
            {"prompt": PROMPT, "truncate_prompt_tokens": -2},
            "truncate_prompt_tokens",
        ),
        ("/v1/completions", {"prompt": PROMPT, "add_special_tokens": False}, "add_special_tokens"),
        ("/v1/completions", {"prompt": PROMPT, "priority": 1}, "priority"),
        (
            "/v1/completions",
            {"prompt": PROMPT, "prompt_logprobs": 0, "stream": True},
            "prompt_logprobs",
        ),  # fmt: skip
        (
            "/v1/completions",
            {"prompt": PROMPT, "truncate_prompt_tokens": 0},
            "truncate_prompt_tokens",
        ),  # fmt: skip
        ("/v1/chat/completions", {"messages": CHAT, "prompt_logprobs": -1}, "prompt_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "add_special_tokens": True},
            "add_special_tokens",
        ),
        ("/v1/chat/completions", {"messages": CHAT, "chat_template": "{{ 1 }}"}, "chat_template"),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "chat_template_kwargs": {"add_generation_prompt": None}},
            "chat_template_kwargs",
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            {"messages": CHAT, "add_generation_prompt": True, "continue_final_message": True},
            "continue_final_message",
        ),  # fmt: skip
    ],
)
def test_invalid_fields_give_openai_errors(client: Any, path: str, body: dict, param: str) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert not error["message"].startswith(("body", "Value error")), error
    assert set(error) == {"message", "type", "param", "code"}
    if param in body and param not in ("prompt", "messages", "stream_options"):
        named = (", got ", "999999 is outside")  # the refused value is named
        assert any(n in error["message"] for n in named), error


def test_a_huge_refused_value_is_not_sent_back_whole(client: Any) -> None:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "suffix": "x" * 100_000})
    assert r.status_code == 400 and len(r.content) < 1000, len(r.content)
    message = r.json()["error"]["message"]
    assert message.startswith("suffix: ") and ", got 'xxx" in message and message.endswith("...")


@pytest.mark.parametrize(
    "body",
    [
        {"echo": False, "add_special_tokens": True, "priority": 0, "use_beam_search": False},
        {"allowed_token_ids": None, "bad_words": [], "response_format": {"type": "text"}},
        # as pydantic (vLLM's models) would coerce them to the unused value
        {"echo": 0, "priority": 0.0, "add_special_tokens": 1, "spaces_between_special_tokens": 1},
        {"response_format": {"type": "text", "json_schema": None}},
    ],
)
def test_vllm_fields_at_unused_values_are_accepted(client: Any, body: dict) -> None:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, **body})
    assert r.status_code == 200, r.text


def test_bad_words_are_taken(client: Any) -> None:
    """vLLM's bad_words (a list of up to 64 texts) on both routes."""
    words = {"bad_words": [" Paris", "the"] * 32}
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, **words})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, **words})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_completion_tokens": 1000}, "max_completion_tokens"),  # past max_model_len
        ({"max_completion_tokens": 2, "min_tokens": 5}, "min_tokens"),
        ({"max_tokens": 9, "max_completion_tokens": 1000}, "max_completion_tokens"),
    ],
)
def test_chat_errors_name_max_completion_tokens_when_sent(
    client: Any, fields: dict, param: str
) -> None:
    """The openai client sends chat's limit as max_completion_tokens: an error about it
    names that field, not max_tokens, which the request did not set (or that lost to it)."""
    r = client.post("/v1/chat/completions", json={"messages": CHAT, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert "max_completion_tokens" in error["message"], error
    assert "max_tokens" not in error["message"], error


def test_an_empty_model_is_the_served_one(client: Any) -> None:
    """As vLLM: `model: ""` (what clients without a model setting send) names the served
    model, as null or leaving it out do; it was a 404. Retrieving model "" stays a 404."""
    served = client.get("/v1/models").json()["data"][0]["id"]
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions",
                                                                 {"messages": CHAT})):  # fmt: skip
        r = client.post(path, json={**body, "model": "", "max_tokens": 2})
        assert r.status_code == 200, (path, r.text)
        assert r.json()["model"] == served
    assert client.get("/v1/models/").status_code == 404


def test_a_body_not_sent_as_json_is_a_400_that_says_so(client: Any) -> None:
    """`curl -d` sends a JSON object as a form: FastAPI does not parse it, and the 400 read
    "Input should be a valid dictionary", of a body that is one; an empty body read "Field
    required". Both now say what to send."""
    raw = json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode()
    form = "application/x-www-form-urlencoded"
    for headers, got in (({"content-type": form}, repr(form)), ({}, "no content-type")):
        error = client.post("/v1/completions", content=raw, headers=headers).json()["error"]
        assert "content-type application/json" in error["message"], error
        assert error["message"].endswith(f"got {got}"), error
        assert error["param"] is None
    r = client.post(
        "/v1/chat/completions", content=b"", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("the request has no body"), r.text
