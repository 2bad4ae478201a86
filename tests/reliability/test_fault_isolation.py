"""Fault isolation, in-process: the detokenizer is made to fail for prompts that carry a
marker. Each poisoned request fails with an error that names the fault, on every route; the
requests running beside it (same engine steps, same /complete batch) complete; and the engine
loop keeps serving with no KV block leaked."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from load_helpers import CHAT_PATH, chat_body, check_sse, sse_payloads, wait_idle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MARKER = "POISONED"
FAULT = "injected detokenizer fault"
MAX_TOKENS = 8


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The detokenizer raises on the `fail_at`-th step of any request whose prompt has MARKER:
    the first step for the non-streamed routes, the third for the streams (mid-stream)."""
    from vllm_runner.engine.detokenizer import IncrementalDetokenizer

    init, add_tokens = IncrementalDetokenizer.__init__, IncrementalDetokenizer.add_tokens

    def marked_init(self: Any, tokenizer: Any, prompt_token_ids: list[int], *a: Any) -> None:
        init(self, tokenizer, prompt_token_ids, *a)
        text = tokenizer.decode(prompt_token_ids)
        self.fail_at = (3 if "mid-stream" in text else 1) if MARKER in text else 0
        self.steps = 0

    def failing_add_tokens(self: Any, token_ids: list[int], *a: Any) -> str | None:
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError(FAULT)
        return add_tokens(self, token_ids, *a)

    monkeypatch.setattr(IncrementalDetokenizer, "__init__", marked_init)
    monkeypatch.setattr(IncrementalDetokenizer, "add_tokens", failing_add_tokens)
    yield


def run_all(calls: dict[str, Any]) -> dict[str, Any]:
    """Run the calls at once (threads); returns their results by name."""
    results: dict[str, Any] = {}

    def run(name: str) -> None:
        results[name] = calls[name]()

    threads = [threading.Thread(target=run, args=(name,)) for name in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def stream(client: Any, path: str, body: dict[str, Any]) -> tuple[int, list[str]]:
    with client.stream("POST", path, json=body) as r:
        return r.status_code, list(r.iter_lines())


def test_a_failing_request_fails_alone(client: Any, engine: Any, poisoned: None) -> None:
    bad, bad_mid = f"Tell a story. {MARKER}", f"Tell a story. {MARKER} mid-stream"
    good = "Tell a story."
    item = {"max_tokens": MAX_TOKENS, "ignore_eos": True}
    calls = {
        "generate bad": lambda: client.post("/generate", json={"prompt": bad, **item}),
        "generate good": lambda: stream(client, "/generate", {"prompt": good, **item}),
        "chat stream bad": lambda: stream(client, CHAT_PATH, chat_body(bad_mid, MAX_TOKENS, True)),
        "chat stream good": lambda: stream(client, CHAT_PATH, chat_body(good, MAX_TOKENS, True)),
        "chat bad": lambda: client.post(CHAT_PATH, json=chat_body(bad, MAX_TOKENS, False)),
        "chat good": lambda: client.post(CHAT_PATH, json=chat_body(good, MAX_TOKENS, False)),
        # one /complete call: the poisoned item shares its batch with a good one
        "complete": lambda: client.post(
            "/complete",
            json={"requests": [{"prompt": bad, **item}, {"prompt": good, **item}]},
        ),
    }
    got = run_all(calls)
    assert len(got) == len(calls)

    r = got["generate bad"]
    assert r.status_code == 500 and FAULT in r.text, r.text
    status, lines = got["generate good"]
    assert status == 200 and "".join(lines)

    status, lines = got["chat stream bad"]  # headers were sent: the error comes in-band
    payloads, done = sse_payloads(lines)
    assert status == 200 and done
    assert FAULT in payloads[-1]["error"]["message"]
    assert sum(bool(c["delta"].get("content")) for p in payloads[:-1] for c in p["choices"]) >= 1
    status, lines = got["chat stream good"]
    assert status == 200 and check_sse(lines, MAX_TOKENS) is None

    r = got["chat bad"]
    assert r.status_code == 500 and FAULT in r.json()["error"]["message"]
    r = got["chat good"]
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS

    r = got["complete"]
    assert r.status_code == 200, r.text
    failed, ok = r.json()
    assert failed["finish_reason"] == "error" and FAULT in failed["error"]
    assert ok["finish_reason"] == "length" and ok["completion_tokens"] == MAX_TOKENS
    assert ok["error"] is None

    stats = wait_idle(engine.stats)
    assert (stats["num_running"], stats["num_waiting"], stats["kv_blocks_used"]) == (0, 0, 0)
    assert engine._thread.is_alive()  # the step loop survived
    r = client.post("/complete", json={"requests": [{"prompt": good, **item}]})
    assert r.status_code == 200 and r.json()[0]["completion_tokens"] == MAX_TOKENS
