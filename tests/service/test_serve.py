"""End to end: a real `bentoml serve` subprocess on a loopback port, driven by real clients."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from service_testing import (
    API_KEY,
    AUTH,
    MAX_MODEL_LEN,
    SERVICE_ENV,
    metric_value,
)

from loadtests.server import BentoServer

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
MAX_CONCURRENCY = 12
LONG_STREAM = {"prompt": "Tell me a long story.", "max_tokens": 200, "ignore_eos": True}
ENGINE_STARTED = r"engine core in its own process \(pid (\d+)\)"
ENGINE_JOINED = r"connected to the shared engine process \(pid (\d+)\)"


class Server(BentoServer):
    engine_pids: set[int]  # the engine processes the workers started or joined

    def stats(self) -> dict[str, int]:
        return httpx.get(f"{self.url}/stats", headers=AUTH, timeout=10).json()


# the engine's loop as a thread of the worker (the CPU default) and as its own process (the
# CUDA default), spawned from inside BentoML's worker
@pytest.fixture(scope="module", params=["thread", "process"])
def server(tmp_path_factory: pytest.TempPathFactory, request) -> Iterator[Server]:
    yield from serve(tmp_path_factory, request.param)


def serve(tmp_path_factory: pytest.TempPathFactory, mode: str) -> Iterator[Server]:
    """`bentoml serve` with the engine's loop as a thread, in a process, or in a process
    that two workers share (`mode`); ready once every worker is."""
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {
        **SERVICE_ENV,
        "VLLM_RUNNER_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
        "VLLM_RUNNER_ENGINE_PROCESS": str(int(mode != "thread")),
        "VLLM_RUNNER_WORKERS": str(2 if mode == "shared" else 1),
    }
    if mode == "shared":  # BentoML gives each worker its share of the service's limit
        env["VLLM_RUNNER_MAX_CONCURRENCY"] = str(2 * MAX_CONCURRENCY)
    env.pop("VLLM_RUNNER_MAX_MODEL_LEN")  # given as --arg instead
    # `bentoml serve` with no target reads `service:` from bentofile.yaml
    srv = Server(home / "serve.log", env, {"max_model_len": str(MAX_MODEL_LEN)}, home)
    try:
        srv.start()
        logs = srv.log.read_text(errors="replace")
        srv.engine_pids = {int(pid) for pid in re.findall(ENGINE_STARTED, logs)}
        assert len(srv.engine_pids) == (mode != "thread")  # one, even for two workers
        joined = {int(pid) for pid in re.findall(ENGINE_JOINED, logs)}
        assert joined == (srv.engine_pids if mode == "shared" else set())
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve(tmp_path_factory, "shared")


def test_openai_client_chat(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert resp.choices[0].message.content == ANSWER
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        client.completions.create(model=MODEL, prompt="hi " * (MAX_MODEL_LEN + 1))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong").models.list()


def test_bentoml_client(server: Server) -> None:
    import bentoml

    with bentoml.SyncHTTPClient(server.url, token=API_KEY, timeout=120) as client:
        # /generate takes its body as one (root) input: a dict, not keyword arguments
        chunks = list(
            client.generate(
                {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
            )
        )
        assert "".join(chunks).startswith(" Paris")
        (done,) = client.complete(
            requests=[{"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}]
        )
        assert done["text"].startswith(" Paris")
        paris, banana = client.score(
            items=[
                {"prompt": "The capital of France is", "continuation": " Paris"},
                {"prompt": "The capital of France is", "continuation": " banana"},
            ]
        )
        assert paris["logprob"] > banana["logprob"]


def test_max_concurrency_then_disconnects_free_the_kv_cache(server: Server) -> None:
    limits = httpx.Limits(max_connections=MAX_CONCURRENCY + 4)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60, limits=limits) as http:
        streams: list[tuple[httpx.Response, Iterator[str]]] = []
        try:
            for _ in range(MAX_CONCURRENCY):
                request = http.build_request("POST", "/generate", json=LONG_STREAM)
                response = http.send(request, stream=True)
                assert response.status_code == 200
                # NOTE: keep the iterator: dropping it would close the connection now
                chunks = response.iter_text()
                next(chunks)  # mid-stream: the first delta has arrived
                streams.append((response, chunks))
            over = http.post("/complete", json={"requests": [{"prompt": "hi"}]})
            assert over.status_code == 429, over.text  # every slot holds a stream
            streams.pop()[0].close()  # frees a slot (and its request) for /stats
            busy = server.stats()
            assert busy["num_running"] + busy["num_waiting"] >= MAX_CONCURRENCY - 2
            assert busy["kv_blocks_used"] > 0
        finally:
            for response, _ in streams:
                response.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = server.stats()
        if stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == 0:
            break
        time.sleep(0.2)
    assert stats["num_running"] == stats["num_waiting"] == 0, stats
    assert stats["kv_blocks_used"] == 0, stats
    # aborted long before their 200 tokens
    assert stats["generation_tokens_total"] < MAX_CONCURRENCY * LONG_STREAM["max_tokens"] / 2


def test_metrics_show_engine_histograms(server: Server) -> None:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in (
        "vllm_runner_time_to_first_token_seconds_count",
        "vllm_runner_inter_token_latency_seconds_count",
        "vllm_runner_e2e_request_latency_seconds_count",
    ):
        assert metric_value(text, name, model_name=MODEL) > 0, name
    assert metric_value(text, "vllm_runner_generation_tokens_total", model_name=MODEL) > 0
    assert metric_value(text, "vllm_runner_request_success_total", finished_reason="abort") >= 1
    assert (
        metric_value(text, "bentoml_service_adaptive_batch_size_count", method_name="complete") >= 1
    )


def test_shutdown_waits_for_in_flight_streams(server: Server) -> None:
    """SIGTERM while a stream runs: the stream still ends normally, then the server exits 0."""
    body = {
        "prompt": "Count from one to fifty:",
        "max_tokens": 24,
        "ignore_eos": True,
        "temperature": 0,
    }
    with httpx.stream(
        "POST", f"{server.url}/generate", json=body, headers=AUTH, timeout=60
    ) as response:
        chunks = response.iter_text()
        first = next(chunks)
        server.proc.send_signal(signal.SIGTERM)
        rest = "".join(chunks)
    assert len(first + rest) > 24  # all 24 tokens arrived (each at least one character)
    assert server.proc.wait(timeout=60) == 0, server.logs()


def test_two_workers_serve_from_one_engine(shared_server: Server) -> None:
    """Requests spread over both workers all get the same greedy answer from the one engine
    process, and its counts reach /metrics once (one worker publishes them)."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": MODEL, "messages": CHAT, "max_tokens": 12, "temperature": 0}

    def chat(_: int) -> str:
        r = httpx.post(
            f"{shared_server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=120
        )
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(8) as pool:  # (within one worker's share of max_concurrency)
        answers = list(pool.map(chat, range(32)))
    assert answers == [ANSWER] * 32
    stats = shared_server.stats()
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0
    text = httpx.get(f"{shared_server.url}/metrics", timeout=10).text
    tokens = metric_value(text, "vllm_runner_generation_tokens_total", model_name=MODEL)
    assert tokens == stats["generation_tokens_total"]  # not once per worker
    blocks = metric_value(text, "vllm_runner_kv_blocks_total", model_name=MODEL)
    assert blocks == stats["kv_blocks_total"]
    successes = metric_value(text, "vllm_runner_request_success_total", model_name=MODEL)
    assert successes == 32  # each worker counts the requests it served


def test_two_workers_stop_with_their_engine(shared_server: Server) -> None:
    """SIGTERM: both workers shut down gracefully, the server exits 0 and the engine
    process they shared ends with them."""
    (pid,) = shared_server.engine_pids
    shared_server.proc.send_signal(signal.SIGTERM)
    assert shared_server.proc.wait(timeout=60) == 0, shared_server.logs()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    pytest.fail(f"the shared engine process {pid} outlived its server")
