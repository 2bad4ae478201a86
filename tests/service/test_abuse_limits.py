"""In-process tests of what one client may ask of the server: inputs whose cost falls on
every other client are refused with a 400 naming the limit, and errors quote no huge input."""

from __future__ import annotations

from typing import Any

from service_testing import CHAT, PROMPT


def test_too_many_stop_strings_are_a_400(client: Any) -> None:
    """Every stop string is searched for in every new token's text, in the engine's step: 20k
    of them held each step of every other request (2.8 ms a token on the 2-core VM, one
    request of n=16 starved a concurrent 4-token request past 300 s)."""
    stop = [f"zz{i}qq" for i in range(20_000)]
    for path, body in (
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": CHAT}),
        ("/generate", {"prompt": PROMPT}),
    ):
        r = client.post(path, json={**body, "max_tokens": 2, "stop": stop})
        assert r.status_code == 400, (path, r.text[:200])
        assert "64" in r.text and "20000" in r.text, r.text[:300]
        assert len(r.text) < 2_000
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stop": stop[:64]})
    assert r.status_code == 200, r.text[:300]


def test_too_many_logit_bias_entries_are_a_400(client: Any) -> None:
    """Each step builds every row's logit_bias tensors anew: 49k entries (any token id of the
    vocabulary) with n=16 made each step of every request 1.5 s longer on CPU. At most 300,
    as OpenAI's API takes."""
    bias = {str(i): 0.5 for i in range(5_000)}
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/generate", {"prompt": PROMPT})):
        r = client.post(path, json={**body, "max_tokens": 2, "logit_bias": bias})
        assert r.status_code == 400, (path, r.text[:200])
        assert "300" in r.text and "5000" in r.text and len(r.text) < 2_000, r.text[:300]
    few = dict(list(bias.items())[:300])
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "logit_bias": few})
    assert r.status_code == 200, r.text[:300]


def test_an_unknown_model_is_not_quoted_back_whole(client: Any) -> None:
    """The 404 quoted a megabyte of model name back (as elsewhere: a bounded excerpt)."""
    for r in (
        client.post("/v1/completions", json={"prompt": PROMPT, "model": "m" * 1_000_000}),
        client.get("/v1/models/" + "m" * 20_000),
    ):
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "mmmm" in r.text and len(r.text) < 1_000, len(r.text)


def test_a_refused_template_argument_is_not_quoted_back_whole(client: Any) -> None:
    """chat_template_kwargs setting the call's own arguments quoted the whole dict back (a
    megabyte of it); the message names the arguments taken."""
    kwargs = {"messages": 1, "pad": "y" * 1_000_000}
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "chat_template_kwargs": kwargs})
    assert r.status_code == 400 and "['messages']" in r.text, r.text[:300]
    assert len(r.text) < 1_000, len(r.text)
