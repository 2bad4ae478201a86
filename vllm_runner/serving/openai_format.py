"""OpenAI response shapes: errors, logprobs, usage, SSE events."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse

DONE = "data: [DONE]\n\n"


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(exc: ValueError, default_param: str | None, fields: set[str]) -> OpenAIError:
    """A 400 for an engine-side ValueError; its message names the field when it starts with one."""
    message = str(exc)
    first = message.split(" ", 1)[0].rstrip(":,")
    return OpenAIError(400, message, param=first if first in fields else default_param)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def envelope(kind: str, request_id: str, model: str, **rest: Any) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, **rest}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def token_decoder(tokenizer: Any) -> Callable[[int], str]:
    if tokenizer is None:
        return lambda tid: f"token_id:{tid}"
    return lambda tid: tokenizer.decode([tid])


def _top(logprobs: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda kv: -kv[1])[:n]


def completion_logprobs(
    decode: Callable[[int], str],
    token_ids: list[int],
    logprobs: list[dict[int, float]],
    top_n: int,
    offset: int = 0,
) -> dict[str, Any]:
    """Legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [decode(t) for t in token_ids]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.get(t) for t, lp in zip(token_ids, logprobs, strict=False)],
        "top_logprobs": [{decode(t): v for t, v in _top(lp, top_n)} for lp in logprobs],
        "text_offset": offsets,
    }


def chat_logprobs(
    decode: Callable[[int], str], token_ids: list[int], logprobs: list[dict[int, float]], top_n: int
) -> dict[str, Any]:
    """Chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""

    def entry(tid: int, lp: float | None) -> dict[str, Any]:
        tok = decode(tid)
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

    return {
        "content": [
            {**entry(t, lp.get(t)), "top_logprobs": [entry(k, v) for k, v in _top(lp, top_n)]}
            for t, lp in zip(token_ids, logprobs, strict=False)
        ]
    }
