"""ApiKeyMiddleware on its own: which requests need the key (BentoML wraps the service's app
in it outside its CORS middleware, as here)."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from vllm_runner.serving.auth import ApiKeyMiddleware
from vllm_runner.serving.settings import ServerSettings

ORIGIN = "http://app.example"


def cors_app(api_key: str) -> TestClient:
    async def generate(_: object) -> PlainTextResponse:
        return PlainTextResponse("text")

    app = Starlette(
        routes=[Route("/generate", generate, methods=["POST"])],
        middleware=[
            Middleware(ApiKeyMiddleware, api_key=api_key),
            Middleware(CORSMiddleware, allow_origins=[ORIGIN], allow_methods=["POST"],
                       allow_headers=["Authorization", "Content-Type"]),
        ],
    )  # fmt: skip
    return TestClient(app)


def test_cors_preflight_needs_no_key() -> None:
    """Browsers send a CORS preflight (OPTIONS) without credentials: with BentoML's CORS
    enabled and an API key set, a 401 there kept every browser client out (as vLLM, the
    preflight passes; the request itself still needs the key)."""
    client = cors_app("secret")
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    r = client.options("/generate", headers=preflight)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert client.post("/generate", headers={"Origin": ORIGIN}).status_code == 401
    authorised = {"Origin": ORIGIN, "Authorization": "Bearer secret"}
    assert client.post("/generate", headers=authorised).text == "text"


def test_a_key_no_header_can_carry_stops_start_up() -> None:
    """A key read from a secret file often keeps its trailing newline; no Authorization
    header can carry leading or trailing whitespace (HTTP strips it), so such a server
    answered every request 401. Start-up refuses it, without echoing the secret."""
    for key in ("s3cret\n", " s3cret", "s3cret "):
        with pytest.raises(ValueError, match="VLLM_RUNNER_API_KEY") as err:
            ServerSettings.load({"VLLM_RUNNER_API_KEY": key}, {})
        assert "whitespace" in str(err.value) and "s3cret" not in str(err.value)
    with pytest.raises(ValueError, match="--arg api_key"):
        ServerSettings.load({}, {"api_key": "s3cret\n"})
    assert ServerSettings.load({}, {"api_key": "s3 cret"}).api_key == "s3 cret"
