"""In-process tests of vLLM's `return_tokens_as_token_ids` on the OpenAI routes: logprobs
name each token "token_id:{id}" (the sampled one, its top_logprobs, an echoed prompt's tokens,
in every streamed chunk and every choice); the text, text_offset and logprob values are those
of the same request without it; false, null or left out, or without logprobs, it changes
nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from service_testing import CHAT, PROMPT

AS_IDS = {"return_tokens_as_token_ids": True}
COMPLETION = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 2}
CHAT_LOGPROBS = {"messages": CHAT, "max_tokens": 4, "temperature": 0, "logprobs": True,
                 "top_logprobs": 2}  # fmt: skip


def post(client: Any, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def chunks(client: Any, path: str, body: dict) -> list[dict]:
    """Each streamed choice (one per chunk), in order."""
    r = client.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [c for d in data[:-1] for c in json.loads(d)["choices"]]


def tid(name: str) -> int:
    """The id of a token named "token_id:{id}" (and that it is named so)."""
    prefix, _, number = name.partition(":")
    assert prefix == "token_id" and number == str(int(number)), name
    return int(number)


def as_text(engine: Any, lp: dict) -> dict:
    """Legacy logprobs named by id, each name replaced by its token's text."""
    text = lambda name: engine.tokenizer.decode([tid(name)])  # noqa: E731
    return {
        **lp,
        "tokens": [text(t) for t in lp["tokens"]],
        "top_logprobs": [
            None if top is None else {text(k): v for k, v in top.items()}
            for top in lp["top_logprobs"]
        ],
    }


def assert_same_completion(got: dict, want: dict) -> None:
    """The same choice: text, tokens and text_offset exactly, logprob values within float
    noise (the two requests' prefills need not share the same prefix-cache hits)."""
    assert {k: v for k, v in got.items() if k != "logprobs"} == {
        k: v for k, v in want.items() if k != "logprobs"
    }
    g, w = got["logprobs"], want["logprobs"]
    assert g["tokens"] == w["tokens"] and g["text_offset"] == w["text_offset"]
    assert g["token_logprobs"] == pytest.approx(w["token_logprobs"], abs=1e-4)
    for g_top, w_top in zip(g["top_logprobs"], w["top_logprobs"], strict=True):
        assert (g_top is None) == (w_top is None)
        assert g_top is None or g_top == pytest.approx(w_top, abs=1e-4)


def test_completion_logprobs_name_tokens_by_id(client: Any, engine: Any) -> None:
    (plain,) = post(client, "/v1/completions", COMPLETION)["choices"]
    (named,) = post(client, "/v1/completions", {**COMPLETION, **AS_IDS})["choices"]
    lp = named["logprobs"]
    ids = [tid(t) for t in lp["tokens"]]
    assert len(ids) == 4 and engine.tokenizer.decode(ids) == named["text"] == plain["text"]
    assert ids[:2] == engine.tokenizer.encode(" Paris.", add_special_tokens=False)
    for i, top, token_lp in zip(ids, lp["top_logprobs"], lp["token_logprobs"], strict=True):
        assert top[f"token_id:{i}"] == token_lp and 1 <= len(top) <= 3
        assert all(tid(k) >= 0 for k in top)
    # the same answer: text unchanged, text_offset still over the text (not the names)
    assert_same_completion({**named, "logprobs": as_text(engine, lp)}, plain)
    assert lp["text_offset"] == [len("".join(plain["logprobs"]["tokens"][:k])) for k in range(4)]


def test_streamed_completions_of_n_choices_name_tokens_by_id(client: Any, engine: Any) -> None:
    """n = 2 sampled (one seed): each choice's chunks carry its tokens named by id, and
    joined they are the whole answer's; the text is the unflagged request's."""
    body = {**COMPLETION, "n": 2, "temperature": 1.0, "seed": 7}
    plain = post(client, "/v1/completions", body)["choices"]
    named = post(client, "/v1/completions", {**body, **AS_IDS})["choices"]
    streamed = chunks(client, "/v1/completions", {**body, **AS_IDS})
    for index, (p, n) in enumerate(zip(plain, named, strict=True)):
        assert n["index"] == p["index"] == index
        assert_same_completion({**n, "logprobs": as_text(engine, n["logprobs"])}, p)
        ids = [tid(t) for t in n["logprobs"]["tokens"]]
        assert engine.tokenizer.decode(ids) == n["text"]
        mine = [c for c in streamed if c["index"] == index]
        assert "".join(c["text"] for c in mine) == n["text"]
        lps = [c["logprobs"] for c in mine if c["logprobs"]]
        assert len(lps) == len(ids)  # one token a chunk
        joined = {k: [x for lp in lps for x in lp[k]] for k in n["logprobs"]}
        assert joined["tokens"] == n["logprobs"]["tokens"]
        assert joined["text_offset"] == n["logprobs"]["text_offset"]
        assert [list(t) for t in joined["top_logprobs"]] == [
            list(t) for t in n["logprobs"]["top_logprobs"]
        ]


def test_echoed_prompt_tokens_are_named_by_id(client: Any, engine: Any) -> None:
    """With echo the prompt's tokens are its own ids; the echoed text stays the prompt's."""
    ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    names = [f"token_id:{i}" for i in ids]
    body = {"prompt": ids, "echo": True, "max_tokens": 2, "temperature": 0, "logprobs": 1}
    (plain,) = post(client, "/v1/completions", body)["choices"]
    (named,) = post(client, "/v1/completions", {**body, **AS_IDS})["choices"]
    lp = named["logprobs"]
    assert named["text"].startswith(PROMPT) and lp["tokens"][: len(ids)] == names
    assert lp["top_logprobs"][0] is None and lp["token_logprobs"][0] is None
    for k in range(1, len(ids)):  # each prompt token's own logprob is among its top ones
        assert lp["top_logprobs"][k][names[k]] == lp["token_logprobs"][k]
    assert_same_completion({**named, "logprobs": as_text(engine, lp)}, plain)
    streamed = chunks(client, "/v1/completions", {**body, **AS_IDS})
    first = streamed[0]
    assert first["text"].startswith(PROMPT) and first["logprobs"]["tokens"][: len(ids)] == names
    for key in ("tokens", "text_offset"):
        assert [x for c in streamed if c["logprobs"] for x in c["logprobs"][key]] == lp[key]
    # the prompt alone (max_tokens 0, as lm-evaluation-harness scores): only its ids
    lm_eval = {**body, "max_tokens": 0, **AS_IDS}
    (alone,) = post(client, "/v1/completions", lm_eval)["choices"]
    assert alone["text"] == PROMPT and alone["logprobs"]["tokens"] == names
    assert alone["logprobs"]["text_offset"] == plain["logprobs"]["text_offset"][: len(ids)]


def test_chat_logprobs_name_tokens_by_id_and_their_bytes_are_the_names(
    client: Any, engine: Any
) -> None:
    (plain,) = post(client, "/v1/chat/completions", CHAT_LOGPROBS)["choices"]
    (named,) = post(client, "/v1/chat/completions", {**CHAT_LOGPROBS, **AS_IDS})["choices"]
    assert named["message"] == plain["message"] and named["finish_reason"] == "length"
    content, want = named["logprobs"]["content"], plain["logprobs"]["content"]
    ids = [tid(e["token"]) for e in content]
    assert len(ids) == 4 and engine.tokenizer.decode(ids) == named["message"]["content"]
    text = lambda name: engine.tokenizer.decode([tid(name)])  # noqa: E731
    for entry, w in zip(content, want, strict=True):
        assert text(entry["token"]) == w["token"]
        assert entry["logprob"] == pytest.approx(w["logprob"], abs=1e-4)
        assert [text(t["token"]) for t in entry["top_logprobs"]] == [
            t["token"] for t in w["top_logprobs"]
        ]
        for e in (entry, *entry["top_logprobs"]):  # bytes: the name's, as the token reads
            assert e["bytes"] == list(e["token"].encode())
    streamed = chunks(client, "/v1/chat/completions", {**CHAT_LOGPROBS, **AS_IDS})
    assert "".join(c["delta"].get("content", "") for c in streamed) == plain["message"]["content"]
    parts = [e for c in streamed if c["logprobs"] for e in c["logprobs"]["content"]]
    assert [(e["token"], e["bytes"]) for e in parts] == [(e["token"], e["bytes"]) for e in content]
    assert [[t["token"] for t in e["top_logprobs"]] for e in parts] == [
        [t["token"] for t in e["top_logprobs"]] for e in content
    ]


def test_a_chat_token_that_is_part_of_a_character_maps_back_to_its_id(engine: Any) -> None:
    """What the field is for: a piece of a multi-byte character reads as U+FFFD, the same
    text for every such piece; named by id each piece stays apart."""
    from vllm_runner.serving import openai_format as fmt

    ids = engine.tokenizer.encode("☃🌟", add_special_tokens=False)
    logprobs = [{i: -0.5} for i in ids]
    as_text = fmt.chat_logprobs(fmt.TokenDecoder(engine.tokenizer), ids, logprobs, 1)
    assert [e["token"] for e in as_text["content"]].count("\ufffd") >= 2
    named = fmt.chat_logprobs(fmt.TokenDecoder(engine.tokenizer, as_ids=True), ids, logprobs, 1)
    assert named["content"] == [
        {
            "token": f"token_id:{i}",
            "logprob": -0.5,
            "bytes": list(f"token_id:{i}".encode()),
            "top_logprobs": [
                {"token": f"token_id:{i}", "logprob": -0.5, "bytes": list(f"token_id:{i}".encode())}
            ],
        }
        for i in ids
    ]


def shown(choice: dict) -> tuple[dict, list]:
    """A choice without its logprobs, and the tokens its logprobs show (their values left
    out: two requests' prefills may differ by float noise)."""
    rest = {k: v for k, v in choice.items() if k != "logprobs"}
    lp = choice["logprobs"]
    if lp is None:
        return rest, []
    if "content" in lp:
        return rest, [(e["token"], e["bytes"], [t["token"] for t in e["top_logprobs"]])
                      for e in lp["content"]]  # fmt: skip
    return rest, [lp["tokens"], lp["text_offset"], [t and list(t) for t in lp["top_logprobs"]]]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}),
        ("/v1/completions", {**COMPLETION, "echo": True}),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "temperature": 0}),
        ("/v1/chat/completions", CHAT_LOGPROBS),
    ],
)
def test_the_flag_off_or_without_logprobs_changes_nothing(
    client: Any, path: str, body: dict
) -> None:
    """false and null answer as the field left out; true without logprobs too (it only
    names logprobs' tokens)."""
    flags: list[Any] = [False, None] if "logprobs" in body else [False, None, True]

    def answer(extra: dict) -> tuple[list, dict]:
        whole = post(client, path, {**body, **extra})
        choices = whole["choices"] + chunks(client, path, {**body, **extra})
        return [shown(c) for c in choices], whole["usage"]

    want = answer({})
    assert any(tokens for _, tokens in want[0]) == ("logprobs" in body)
    for flag in flags:
        assert answer({"return_tokens_as_token_ids": flag}) == want, flag


def test_a_value_that_is_no_flag_is_a_400_naming_it(client: Any) -> None:
    body = {"prompt": PROMPT, "return_tokens_as_token_ids": "sometimes"}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "return_tokens_as_token_ids" and "'sometimes'" in error["message"]
