"""Optional API key: `Authorization: Bearer <key>` on every route but the probes and
/metrics (and CORS preflights)."""

from __future__ import annotations

import hmac
from typing import Any

from starlette.responses import JSONResponse

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/health", "/metrics"})


class ApiKeyMiddleware:
    """ASGI middleware answering 401 (OpenAI error shape) without the right bearer token."""

    def __init__(self, app: Any, api_key: str | None = None) -> None:
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            self.expected is None
            or scope["type"] != "http"
            # NOTE: browsers send a CORS preflight without credentials; BentoML's CORS
            # middleware (inside this one) answers it, as vLLM lets it through its key check
            or scope["method"] == "OPTIONS"
            or scope["path"].rstrip("/") in OPEN_PATHS
        ):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")  # the scheme is case-insensitive (RFC 7235)
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected):
            await self.app(scope, receive, send)
            return
        body = {
            "error": {
                "message": "Missing or invalid API key: send 'Authorization: Bearer <key>'",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
