"""POST /v1/embeddings on the service, in process (the default model, SmolLM2-135M: hidden size
576): OpenAI's response shape, base64 of the same float32 values, usage, and errors that
name the value and the limit."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest
import torch
from service_testing import MAX_MODEL_LEN, PROMPT

HIDDEN = 576
PROMPT_IDS = [504, 3575, 282, 4649, 314]  # PROMPT's ids with the default model's tokenizer


def post(client: Any, **body: Any) -> Any:
    return client.post("/v1/embeddings", json=body)


def error(response: Any, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_texts_embed_as_the_engine_does_in_openais_shape(
    client: Any, engine: Any, smol_llm: Any
) -> None:
    texts = [PROMPT, "Hello there, how are you?"]
    r = post(client, input=texts, model=engine.model_name, user="u1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["id", "object", "created", "model", "data", "usage"]
    assert body["id"].startswith("embd-") and body["object"] == "list"
    assert isinstance(body["created"], int) and body["model"] == engine.model_name
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    want = smol_llm.embed(texts)  # the engine's LLM on the same weights: LAST, normalised
    for d, w in zip(body["data"], want, strict=True):
        got = torch.tensor(d["embedding"])
        assert got.shape == (HIDDEN,)
        torch.testing.assert_close(got, torch.tensor(w.outputs.embedding), rtol=1e-5, atol=1e-5)
        assert abs(float(got.norm()) - 1.0) < 1e-5
    tokens = sum(len(engine.tokenizer.encode(t)) for t in texts)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert engine.stats()["kv_blocks_used"] == 0


def test_base64_holds_the_same_float32_values(client: Any) -> None:
    texts = [PROMPT, "Hello"]
    floats = post(client, input=texts).json()["data"]
    encoded = post(client, input=texts, encoding_format="base64").json()["data"]
    for f, b in zip(floats, encoded, strict=True):
        raw = base64.b64decode(b["embedding"])
        assert len(raw) == 4 * HIDDEN
        assert list(struct.unpack(f"<{HIDDEN}f", raw)) == f["embedding"]


def test_token_id_inputs_and_their_usage(client: Any) -> None:
    text = post(client, input=PROMPT).json()
    ids = post(client, input=PROMPT_IDS).json()
    assert ids["usage"] == text["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    torch.testing.assert_close(
        torch.tensor(ids["data"][0]["embedding"]),
        torch.tensor(text["data"][0]["embedding"]),
        rtol=1e-5,
        atol=1e-5,
    )
    many = post(client, input=[PROMPT_IDS, PROMPT_IDS[:2], [7]]).json()
    assert [d["index"] for d in many["data"]] == [0, 1, 2]
    assert many["usage"] == {"prompt_tokens": 8, "total_tokens": 8}
    full = post(client, input=list(range(1, MAX_MODEL_LEN + 1)))  # max_model_len tokens: taken
    assert full.status_code == 200 and full.json()["usage"]["prompt_tokens"] == MAX_MODEL_LEN
    cut = post(client, input=list(range(1, 300)), truncate_prompt_tokens=5).json()
    assert cut["usage"]["prompt_tokens"] == 5
    assert post(client, input="x", dimensions=HIDDEN).status_code == 200


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"input": ""}, "input",
         "input: must not be empty: give a text, a list of texts or token ids, got ''"),
        ({"input": []}, "input", "must not be empty: give a text, a list of texts or token ids, "
                                 "got []"),
        ({"input": ["a", ""]}, "input", "input: input 1 is empty (''): give at least one "
                                        "character or token id"),
        ({"input": [[3], []]}, "input", "input 1 is empty ([])"),
        ({"input": [1, "a"]}, "input", "input: must be a text, a list of texts, a list of "
                                       "token ids or a list of token-id lists: input 0 is "
                                       "[1, 'a']"),
        ({"input": ["a", [1]]}, "input", "token-id lists: input 0 is 'a'"),
        ({"input": [[1], [2, True]]}, "input", "token-id lists: input 1 is [2, True]"),
        ({"input": 5}, "input", "token-id lists, got int"),
        ({"input": [[3], [4, -1]]}, "input", "input: token id -1 (input 1) must be >= 0"),
        ({"input": ["a"] * 2049}, "input", "at most 2048 inputs, got 2049"),
        ({"input": "a", "dimensions": 100}, "dimensions",
         "dimensions 100 is not supported: this model's embeddings have 576 (it is not trained "
         "for shorter, matryoshka, ones); leave dimensions out or give 576"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
        ({"input": [5, 49152]}, "input",
         "prompt token id 49152 is outside the vocabulary [0, 49152)"),
        ({"input": "a", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens",
         "truncate_prompt_tokens must be -1 or an integer >= 1, got 0"),
        ({"input": "a", "priority": 1}, "priority", "priority must be 0 unless"),
    ],
)  # fmt: skip
def test_bad_requests_name_the_value_and_the_limit(
    client: Any, body: dict, param: str, message: str
) -> None:
    e = error(post(client, **body))
    assert message in e["message"] and e["param"] == param and e["type"] == "invalid_request_error"


def test_a_prompt_past_max_model_len_is_a_context_length_error(client: Any) -> None:
    e = error(post(client, input=[[1, 2], list(range(1, MAX_MODEL_LEN + 2))]))
    assert e["code"] == "context_length_exceeded" and e["param"] == "input"
    assert e["message"] == (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. input 1: prompt has "
        f"{MAX_MODEL_LEN + 1} tokens, but max_model_len is {MAX_MODEL_LEN} (an embedding's "
        "prompt may have that many at most)"
    )


def test_another_model_is_not_found(client: Any) -> None:
    e = error(post(client, input="a", model="other"), 404)
    assert e["code"] == "model_not_found" and e["param"] == "model"
