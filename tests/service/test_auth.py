"""ApiKeyMiddleware on its own: which requests need the key (BentoML wraps the service's app
in it outside its CORS middleware, as here)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from vllm_runner.serving.auth import ApiKeyMiddleware

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
