"""Fuzzing of the HTTP API from its own OpenAPI schema (schemathesis, over real sockets): valid
and schema-violating bodies for every POST route must never get a 5xx, nor a 200 stream with
an error event in it. Generation is bounded (few examples, tiny max_tokens and n)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from load_helpers import server_errors, sse_payloads

from loadtests.server import BentoServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLES = 25  # per route and generation mode
CAPS = {"max_tokens": 3, "max_completion_tokens": 3, "n": 2}
MAX_ITEMS = 3  # of a /complete or /score batch


def bounded(value: Any) -> Any:
    """The body with generation kept cheap: big max_tokens / n cut down, long batches cut short.
    Values of the wrong type or below the limits are left for the server to reject."""
    if isinstance(value, list):
        return [bounded(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, v in value.items():
        cap = CAPS.get(key)
        if cap is not None and type(v) is int and v > cap:
            v = cap
        elif key in ("requests", "items") and isinstance(v, list):
            v = v[:MAX_ITEMS]
        out[key] = bounded(v)
    return out


def unbounded(body: dict[str, Any]) -> bool:
    return body.get("max_tokens") is None and body.get("max_completion_tokens") is None


ROUTES = [
    "/complete",
    "/detokenize",
    "/generate",
    "/score",
    "/tokenize",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
]


@pytest.fixture
def api_schema(server: BentoServer) -> Any:
    raw = httpx.get(f"{server.url}/docs.json", headers=server.headers, timeout=10).json()
    # NOTE: BentoML labels its merged schema 3.0.2, but the pydantic v2 / FastAPI parts in it
    # are OpenAPI 3.1 (numeric exclusiveMinimum), which a 3.0 validator rejects.
    raw["openapi"] = "3.1.0"
    return schemathesis.openapi.from_dict(raw)


def test_the_fuzzed_routes_are_all_post_routes(api_schema: Any) -> None:
    posts = [op.ok() for op in api_schema.get_all_operations()]
    assert sorted(op.path for op in posts if op.method.upper() == "POST") == ROUTES


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
@pytest.mark.parametrize("path", ROUTES)
def test_no_5xx(api_schema: Any, server: BentoServer, path: str, mode: Any) -> None:
    strategy = api_schema[path]["POST"].as_strategy(generation_mode=mode)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: each example costs a request
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def call(case: Any) -> None:
        if isinstance(case.body, dict | list):
            case.body = bounded(case.body)
        # the OpenAI routes' max_tokens defaults to "up to max_model_len": bound it too
        if isinstance(case.body, dict) and path.startswith("/v1/") and unbounded(case.body):
            case.body["max_tokens"] = CAPS["max_tokens"]
        log_start = len(server.logs(tail=10**9))
        response = case.call(base_url=server.url, headers=server.headers, timeout=120)
        assert response.status_code < 500, (case.body, response.text[:500])
        content_type = response.headers.get("content-type", [""])[0]
        if content_type.startswith("text/event-stream"):
            payloads, _ = sse_payloads(response.text.splitlines())
            assert not [p for p in payloads if "error" in p], (case.body, response.text[-500:])
        assert not server_errors(server.logs(tail=10**9)[log_start:]), case.body

    call()


# Extremes within the schema that random generation reaches only by luck (huge seeds once
# overflowed the sampler's generator and answered 500).
EDGE_FIELDS = [
    {"seed": 2**70},
    {"seed": -(2**70)},
    {"seed": -13238520144039},
    {"top_k": 2**40},
    {"temperature": 1e308},
    {"top_p": 1e-300, "min_p": 1.0},
    {"presence_penalty": 2.0, "frequency_penalty": -2.0, "repetition_penalty": 10.0},
]


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_stop_token_ids_outside_the_vocabulary_are_a_400(server: BentoServer, path: str) -> None:
    """Found by the fuzzer: with min_tokens they once failed the whole engine step."""
    body = {"prompt": "Once upon a time", "max_tokens": 2, "min_tokens": 1,
            "stop_token_ids": [5, 2**40]}  # fmt: skip
    r = httpx.post(f"{server.url}{path}", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 400 and "stop_token_ids entry 1099511627776" in r.text, r.text


@pytest.mark.parametrize("fields", EDGE_FIELDS, ids=lambda f: ",".join(f))
@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_extreme_valid_values_are_served(server: BentoServer, path: str, fields: dict) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 2, **fields}
    r = httpx.post(f"{server.url}{path}", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
