"""vLLM's prompt_logprobs, chat echo and chat_template on the OpenAI routes, over a scripted
engine (``serving_fakes.FakeEngine``, sending given updates): exact shapes, as vLLM's server
gives them. Fast: no model, no BentoML. (Values against the model: tests/service.)"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from serving_fakes import FakeEngine, update
from starlette.testclient import TestClient

from vllm_runner.serving.protocol import CompletionRequest

# the engine's list for the prompt "a b c" (ids 100, 101, 102) with a top-2: 101 is ranked
# 3rd (outside the top 2), 102 1st (its own entry is one of the top 2)
ENGINE_LOGPROBS = [None, {101: -2.0, 7: -0.5, 9: -1.0}, {102: -0.1, 8: -3.0}]
ENGINE_RANKS = [None, 3, 1]


def entry(lp: float, rank: int) -> dict[str, Any]:
    return {"logprob": lp, "rank": rank, "decoded_token": None}  # (no tokenizer: no text)


def client_for(engine: FakeEngine) -> TestClient:
    from vllm_runner.serving.openai_api import create_openai_app

    return TestClient(create_openai_app(lambda: engine))


def scored(index: int = 0) -> list[Any]:
    """One choice's two updates, the first with the prompt's logprobs and ranks."""
    ids = [100, 101, 102]
    first = update(index, "<10>", [10], 1, False, [{10: -1.0}], ids)
    first = dataclasses.replace(first, prompt_logprobs=ENGINE_LOGPROBS, prompt_ranks=ENGINE_RANKS)
    return [first, update(index, "<20>", [20], 2, True, [{20: -1.0}], ids)]


def chunks(response: Any) -> list[dict]:
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d)["choices"][0] for d in data[:-1]]


@pytest.mark.parametrize(
    ("k", "want"),
    [
        (0, [None, {"101": entry(-2.0, 3)}, {"102": entry(-0.1, 1)}]),
        (1, [None, {"101": entry(-2.0, 3), "7": entry(-0.5, 1)}, {"102": entry(-0.1, 1)}]),
        (2, [None, {"101": entry(-2.0, 3), "7": entry(-0.5, 1), "9": entry(-1.0, 2)},
             {"102": entry(-0.1, 1), "8": entry(-3.0, 2)}]),
    ],
)  # fmt: skip
def test_each_completion_choice_carries_its_prompts_list(k: int, want: list) -> None:
    """vLLM's shape: the prompt token first, then the top k by rank (an engine's list of a
    larger top-k is cut to the request's)."""
    client = client_for(FakeEngine([*scored(0), *scored(1)]))
    body = {"prompt": "a b c", "max_tokens": 2, "n": 2, "prompt_logprobs": k}
    choices = client.post("/v1/completions", json=body).json()["choices"]
    assert [c["prompt_logprobs"] for c in choices] == [want, want]
    assert list(choices[0]) == ["index", "text", "logprobs", "finish_reason", "stop_reason",
                                "prompt_logprobs"]  # fmt: skip
    without = client.post("/v1/completions", json={**body, "prompt_logprobs": None}).json()
    assert all("prompt_logprobs" not in c for c in without["choices"])


def test_chat_carries_them_once_on_the_response() -> None:
    """vLLM's chat puts them beside usage, once for all n choices."""
    client = client_for(FakeEngine([*scored(0), *scored(1)]))
    body = {"messages": [{"role": "user", "content": "a b c"}], "max_tokens": 2, "n": 2}
    r = client.post("/v1/chat/completions", json={**body, "prompt_logprobs": 0}).json()
    assert r["prompt_logprobs"] == [None, {"101": entry(-2.0, 3)}, {"102": entry(-0.1, 1)}]
    assert list(r) == ["id", "object", "created", "model", "choices", "usage", "prompt_logprobs"]
    assert all("prompt_logprobs" not in c for c in r["choices"])
    assert "prompt_logprobs" not in client.post("/v1/chat/completions", json=body).json()


def test_echoed_logprobs_keep_their_own_top_k() -> None:
    """echo with logprobs 0 and prompt_logprobs 2: the engine lists the top 2 once; the
    echoed prompt's top_logprobs hold its own token only, as without prompt_logprobs."""
    client = client_for(FakeEngine(scored()))
    body = {"prompt": "a b c", "max_tokens": 2, "echo": True, "logprobs": 0, "prompt_logprobs": 2}
    (choice,) = client.post("/v1/completions", json=body).json()["choices"]
    assert choice["logprobs"]["top_logprobs"] == [
        None,
        {"token_id:101": -2.0},
        {"token_id:102": -0.1},
        {"token_id:10": -1.0},
        {"token_id:20": -1.0},
    ]
    assert len(choice["prompt_logprobs"][1]) == 3  # (the prompt token and its top 2)


@pytest.mark.parametrize(
    ("fields", "engine_k"),
    [
        ({"prompt_logprobs": 3}, 3),
        ({"prompt_logprobs": 3, "echo": True, "logprobs": 1}, 3),
        ({"prompt_logprobs": 1, "echo": True, "logprobs": 4}, 4),
        ({"echo": True, "logprobs": 0}, 0),
        ({"logprobs": 2}, None),  # (no echo: no prompt's logprobs)
    ],
)
def test_the_engine_scores_the_prompt_for_the_larger_ask(fields: dict, engine_k: Any) -> None:
    params = CompletionRequest(prompt="hi", **fields).completion_sampling_params({})
    assert params.prompt_logprobs == engine_k


CONTINUED = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c d"}]


@pytest.mark.parametrize(
    ("messages", "options", "echo"),
    [
        (CONTINUED, {}, "c d"),  # the reply is the assistant's: so was the last message
        (CONTINUED, {"add_generation_prompt": False, "continue_final_message": True}, "c d"),
        (CONTINUED[:1], {}, ""),  # a user's message: not the reply's role
        (CONTINUED[:1], {"add_generation_prompt": False}, "a b"),  # (vLLM's: then it is)
        ([{"role": "assistant", "content": [{"type": "text", "text": "x"},
                                            {"type": "text", "text": "y"}]}], {}, "x\ny"),
    ],
)  # fmt: skip
def test_chat_echo_starts_each_reply_with_the_continued_message(
    messages: list, options: dict, echo: str
) -> None:
    """vLLM's rule: the last message's content when its role is the reply's (text parts as
    lines); streamed, a chunk of it per choice after the role chunks."""
    client = client_for(FakeEngine())
    body = {"messages": messages, "max_tokens": 2, "n": 2, "echo": True, **options}
    r = client.post("/v1/chat/completions", json=body).json()
    assert [c["message"]["content"] for c in r["choices"]] == [f"{echo}<10><20>", f"{echo}<11><21>"]
    streamed = chunks(client.post("/v1/chat/completions", json={**body, "stream": True}))
    heads = [(c["index"], c["delta"]) for c in streamed[: 4 if echo else 2]]
    role = {"role": "assistant", "content": ""}
    echoed = [(0, {"content": echo}), (1, {"content": echo})] if echo else []
    assert heads == [(0, role), (1, role), *echoed]
    assert all(c["logprobs"] is None and c["finish_reason"] is None for c in streamed[2:4])
    texts = ["".join(c["delta"].get("content", "") for c in streamed if c["index"] == i)
             for i in (0, 1)]  # fmt: skip
    assert texts == [c["message"]["content"] for c in r["choices"]]


class TemplateRecorder(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.templates: list[Any] = []

    def apply_chat_template(self, messages: list[dict], **options: Any) -> str:
        self.templates.append(options["chat_template"])
        return super().apply_chat_template(messages, **options)


def test_a_requests_template_reaches_the_engine_only_when_trusted() -> None:
    from vllm_runner.serving.openai_api import create_openai_app
    from vllm_runner.serving.settings import ServerSettings

    engine = TemplateRecorder()
    body = {"messages": CONTINUED, "max_tokens": 1, "chat_template": "{{ messages }}"}
    r = TestClient(create_openai_app(lambda: engine)).post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template", r.text
    trusted = TestClient(create_openai_app(lambda: engine, trust_request_chat_template=True))
    assert trusted.post("/v1/chat/completions", json=body).status_code == 200
    assert trusted.post("/v1/chat/completions", json={**body, "chat_template": None}).is_success
    assert engine.templates == ["{{ messages }}", None]
    # the server setting, off unless set (as vLLM's flag)
    assert ServerSettings().trust_request_chat_template is False
    on = ServerSettings.load({"VLLM_RUNNER_TRUST_REQUEST_CHAT_TEMPLATE": "true"}, {})
    assert on.trust_request_chat_template is True
    assert "trust_request_chat_template" not in on.engine_kwargs()
