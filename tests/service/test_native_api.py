"""In-process tests of the native endpoints (/generate, /complete, /score) and the probes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from service_testing import AUTH, MAX_MODEL_LEN, PROMPT, metric_value

GREEDY = {"temperature": 0.0}


@contextlib.contextmanager
def engine_unloaded(error: Exception | None = None) -> Iterator[None]:
    """As while the model loads (or after loading failed with `error`)."""
    import bentoml

    svc = bentoml.get_current_service()
    engine, svc.engine, svc.load_error = svc.engine, None, error
    try:
        yield
    finally:
        svc.engine, svc.load_error = engine, None


def test_probes(client: Any) -> None:
    assert client.get("/readyz").status_code == 200
    assert client.get("/livez").status_code == 200


def test_not_ready_answers_503(client: Any) -> None:
    with engine_unloaded():
        assert client.get("/readyz", headers={}).status_code == 503
        assert client.post("/generate", json={"prompt": "hi"}).status_code == 503
        assert client.post("/complete", json={"requests": [{"prompt": "hi"}]}).status_code == 503
        r = client.get("/v1/models")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "model_not_ready"
    assert client.get("/readyz").status_code == 200


def test_failed_load_is_not_alive(client: Any) -> None:
    with engine_unloaded(RuntimeError("no such folder: /models/x")):
        assert client.get("/livez").status_code == 503
        assert client.get("/readyz").status_code == 503
        r = client.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503
        assert "failed to load: no such folder" in r.json()["error"]["message"]
    assert client.get("/livez").status_code == 200


def test_a_dead_engine_answers_503_naming_why(client: Any, monkeypatch) -> None:
    """The engine's loop stopped (its process died): /generate, before its first chunk, and
    the OpenAI routes answer 503 with the reason (a raised 5xx's message BentoML hides) in
    JSON, as BentoML's own 400 / 429 / 504 on /generate; the probes fail."""
    import bentoml

    from vllm_runner.async_llm import EngineDeadError

    engine = bentoml.get_current_service().engine
    reason = "the engine process exited (code -9)"

    async def dead_stream(*args, **kwargs):
        raise EngineDeadError(reason)
        yield  # (an async generator)

    monkeypatch.setattr(engine, "stream", dead_stream)
    r = client.post("/generate", json={"prompt": "hi"})  # in flight as it died
    assert r.status_code == 503 and r.json() == {"error": reason}
    assert r.headers["content-type"] == "application/json"
    monkeypatch.setattr(engine, "error", reason)
    r = client.post("/generate", json={"prompt": "hi"})  # after
    assert r.status_code == 503 and r.json() == {"error": f"the engine stopped: {reason}"}
    assert r.headers["content-type"] == "application/json"
    r = client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and reason in r.json()["error"]["message"]
    assert client.get("/v1/models").status_code == 503  # (not listed as if it served)
    assert client.get("/livez").status_code == 503 and client.get("/readyz").status_code == 503
    monkeypatch.undo()
    assert client.get("/livez").status_code == 200


def test_an_engine_that_dies_under_a_batch_answers_503(
    client: Any, engine: Any, monkeypatch
) -> None:
    """The engine dies while a /complete or /score batch runs: 503, as for a batch that
    arrives after (its message BentoML hides), not an internal error's 500."""
    from vllm_runner.async_llm import EngineDeadError

    async def dies(*args: Any, **kwargs: Any) -> Any:
        raise EngineDeadError("the engine process exited (code -9)")

    monkeypatch.setattr(engine, "generate", dies)
    r = client.post("/complete", json={"requests": [{"prompt": PROMPT, "max_tokens": 2}]})
    assert r.status_code == 503, r.text
    r = client.post("/score", json={"items": [{"prompt": PROMPT, "continuation": " Paris"}]})
    assert r.status_code == 503, r.text


def test_generate_streams_text_deltas(client: Any) -> None:
    body = {"prompt": PROMPT, "max_tokens": 4, **GREEDY}
    with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        chunks = list(r.iter_text())
    text = "".join(chunks)
    assert text.startswith(" Paris")
    assert len(chunks) >= 2


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"prompt": PROMPT, "top_p": 0}, ["top_p"]),
        ({"prompt": PROMPT, "temperature": -0.5}, ["temperature"]),
        ({"prompt": PROMPT, "max_tokens": 0}, ["max_tokens"]),
        ({"prompt": PROMPT, "min_tokens": 9, "max_tokens": 4}, ["min_tokens", "max_tokens (4)"]),
        ({"prompt": PROMPT, "stop": [""]}, ["stop"]),
        ({"prompt": PROMPT, "tempreature": 0.5}, ["tempreature", "Extra inputs"]),
        ({"prompt": ""}, ["prompt"]),
        ({"max_tokens": 4}, ["prompt", "Field required"]),
    ],
)
def test_generate_rejects_invalid_fields(client: Any, body: dict, names: list[str]) -> None:
    r = client.post("/generate", json=body)
    assert r.status_code == 400, r.text
    for name in names:
        assert name in r.text


def test_prompt_over_max_model_len_names_both_lengths(client: Any) -> None:
    long_prompt = "hello " * (MAX_MODEL_LEN + 10)
    for path, body in [
        ("/generate", {"prompt": long_prompt}),
        ("/complete", {"requests": [{"prompt": long_prompt}]}),
        ("/score", {"items": [{"prompt": long_prompt, "continuation": " x"}]}),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == 400, (path, r.text)
        assert f"max_model_len is {MAX_MODEL_LEN}" in r.text
        assert "prompt has" in r.text


def test_complete_returns_whole_completions(client: Any) -> None:
    body = {
        "requests": [
            {"prompt": PROMPT, "max_tokens": 3, **GREEDY},
            {"prompt": [504, 3458, 282, 4649, 314], "max_tokens": 2, **GREEDY},
            {"prompt": PROMPT, "max_tokens": 8, "stop": ["."], **GREEDY},
        ]
    }
    r = client.post("/complete", json=body)
    assert r.status_code == 200, r.text
    first, second, stopped = r.json()
    assert first["text"].startswith(" Paris")
    assert first["finish_reason"] == "length" and first["stop_reason"] is None
    assert (first["prompt_tokens"], first["completion_tokens"]) == (5, 3)
    assert second["completion_tokens"] == 2
    assert stopped["text"] == " Paris" and stopped["stop_reason"] == "."


def test_concurrent_complete_requests_reach_the_engine_in_batches(client: Any, engine: Any) -> None:
    sizes: list[int] = []
    original = engine.generate

    async def recording_generate(prompts: Any, params: Any = None, priority: Any = None) -> Any:
        sizes.append(len(prompts))
        return await original(prompts, params, priority=priority)

    def batch_metric() -> tuple[float, float]:
        text = client.get("/metrics").text
        labels = {"method_name": "complete"}
        return (
            metric_value(text, "bentoml_service_adaptive_batch_size_count", **labels),
            metric_value(text, "bentoml_service_adaptive_batch_size_sum", **labels),
        )

    count0, sum0 = batch_metric()
    engine.generate = recording_generate
    results: list[int] = []
    try:

        def call(i: int) -> None:
            body = {"requests": [{"prompt": f"Count to {i}:", "max_tokens": 8, **GREEDY}]}
            results.append(client.post("/complete", json=body).status_code)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del engine.generate  # back to the class method
    assert results == [200] * 12
    assert sum(sizes) == 12
    assert max(sizes) > 1, sizes  # one engine call carried several HTTP requests
    count1, sum1 = batch_metric()
    assert sum1 - sum0 == 12
    assert count1 - count0 == len(sizes) < 12


def test_a_bad_item_fails_alone(client: Any) -> None:
    results: dict[str, int] = {}

    def call(name: str, prompt: str) -> None:
        body = {"requests": [{"prompt": prompt, "max_tokens": 2}]}
        results[name] = client.post("/complete", json=body).status_code

    threads = [
        threading.Thread(target=call, args=("good", PROMPT)),
        threading.Thread(target=call, args=("bad", "x " * (MAX_MODEL_LEN + 1))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"good": 200, "bad": 400}


def test_long_texts_are_tokenized_off_the_event_loop(client: Any, engine: Any, monkeypatch) -> None:
    """Texts past PARSE_TIME_CHARS (here 4 characters) are tokenized in the handler, in a
    thread, not while BentoML parses the request on the worker's event loop: the results
    are the same, and one the engine refuses gets its own error result (200), the batch's
    other items their answers. (Their lengths count together: a short prompt with a long
    continuation is tokenized in the handler too.)"""
    from vllm_runner.serving import batched

    monkeypatch.setattr(batched, "PARSE_TIME_CHARS", 4)
    threads: list[str] = []
    validate = engine.validate

    def recording_validate(prompt: Any, *args: Any, **kw: Any) -> Any:
        if isinstance(prompt, str):  # tokenizing (token ids are checked again, cheaply)
            threads.append(threading.current_thread().name)
        return validate(prompt, *args, **kw)

    monkeypatch.setattr(engine, "validate", recording_validate)
    body = {"requests": [{"prompt": PROMPT, "max_tokens": 3, **GREEDY},
                         {"prompt": "x " * (MAX_MODEL_LEN + 1), "max_tokens": 2}]}  # fmt: skip
    r = client.post("/complete", json=body)
    assert r.status_code == 200, r.text
    good, refused = r.json()
    assert good["text"].startswith(" Paris") and good["error"] is None
    assert refused["finish_reason"] == "error" and refused["prompt_tokens"] == 0
    assert f"max_model_len is {MAX_MODEL_LEN}" in refused["error"]
    items = [{"prompt": PROMPT, "continuation": " Paris"},
             {"prompt": "The", "continuation": "y " * MAX_MODEL_LEN}]  # fmt: skip
    r = client.post("/score", json={"items": items})
    assert r.status_code == 200, r.text
    scored, refused = r.json()
    assert scored["num_tokens"] == 1 and -1.0 < scored["logprob"] < 0.0
    assert refused["logprob"] is None and "max_model_len" in refused["error"]
    assert threads and threading.main_thread().name not in threads
    loop_thread = client.portal.call(lambda: threading.current_thread().name)
    assert loop_thread not in threads


def test_stats_are_fresh_while_idle(client: Any, engine: Any) -> None:
    """A stream dropped mid-way on an otherwise idle engine shows 0 KV blocks used."""
    from vllm_runner import SamplingParams

    async def start_then_drop() -> None:
        stream = engine.stream(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()  # what a client disconnect does to the handler's stream

    client.portal.call(start_then_drop)
    # (the loop takes the abort at its next step: polled, since a loaded machine's step
    # outlasted the 0.5 s this waited; stale stats never turn idle)
    deadline = time.monotonic() + 30
    while (stats := engine.stats())["kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (stats["num_running"], stats["kv_blocks_used"]) == (0, 0), stats


def test_api_key_is_required(client: Any) -> None:
    no_auth = {"Authorization": ""}
    for method, path in [
        ("POST", "/generate"),
        ("POST", "/complete"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/stats"),
    ]:
        r = client.request(method, path, headers=no_auth, json={})
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive, the key is not
        key = AUTH["Authorization"].split(" ", 1)[1]
        assert client.get("/v1/models", headers={"Authorization": f"{scheme} {key}"}).is_success
        wrong = {"Authorization": f"{scheme} {key.upper()}"}
        assert client.get("/v1/models", headers=wrong).status_code == 401
    for path in ("/readyz", "/livez", "/healthz", "/metrics"):  # docs/serving.md: api_key
        assert client.get(path, headers=no_auth).status_code == 200


def test_metrics_show_engine_metrics(client: Any) -> None:
    client.post("/complete", json={"requests": [{"prompt": PROMPT, "max_tokens": 3}]})
    text = client.get("/metrics").text
    for name in (
        "vllm_runner_time_to_first_token_seconds_count",
        "vllm_runner_inter_token_latency_seconds_count",
        "vllm_runner_e2e_request_latency_seconds_count",
        "vllm_runner_generation_tokens_total",
        "vllm_runner_prompt_tokens_total",
    ):
        assert metric_value(text, name) > 0, name
    for name in (
        "vllm_runner_num_requests_running",
        "vllm_runner_num_requests_waiting",
        "vllm_runner_kv_blocks_used",
        "vllm_runner_prefix_cache_queries_total",
        "vllm_runner_prefix_cache_hits_total",
    ):
        metric_value(text, name)
    assert metric_value(text, "vllm_runner_kv_blocks_total") > 0


def test_generate_aborts_when_the_client_leaves_before_the_first_token(
    client: Any, engine: Any
) -> None:
    """BentoML awaits a stream's first chunk before it sends anything; a client that leaves
    while its request waits (an overloaded server) must abort it, not leave it queued."""
    import asyncio
    import json

    from service_testing import post_scope, receive_then_leave

    started, cancelled = asyncio.Event(), []

    async def queued_forever(*args: Any, **kwargs: Any) -> Any:
        started.set()
        try:
            await asyncio.Event().wait()  # never produces a token
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        yield  # an async generator

    async def leave_while_queued() -> None:
        receive = receive_then_leave(json.dumps({"prompt": PROMPT}).encode(), started)

        async def send(message: dict) -> None:
            pass

        await asyncio.wait_for(client.app(post_scope("/generate"), receive, send), 60)

    engine.stream = queued_forever
    try:
        client.portal.call(leave_while_queued)
    finally:
        del engine.stream
    assert cancelled == [True]
