"""OpenAI response shapes: errors, logprobs, usage, SSE events."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from vllm_runner.tokenizer import piece_bytes

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


# the answer to a client that left before its completion: nobody reads it
CLIENT_GONE = OpenAIError(499, "client disconnected", "client_closed_request")


def bad_request(exc: ValueError, default_param: str | None, fields: set[str]) -> OpenAIError:
    """A 400 for an engine-side ValueError; its message names the field when it starts with one."""
    message = str(exc)
    first = message.split(" ", 1)[0].rstrip(":,")
    return OpenAIError(400, message, param=first if first in fields else default_param)


def context_length(error: OpenAIError, max_model_len: int) -> OpenAIError:
    """``error`` (a request past the context) as OpenAI and vLLM word it: clients key on this
    lead sentence and code (e.g. litellm's ContextWindowExceededError, its fallbacks)."""
    lead = f"This model's maximum context length is {max_model_len} tokens"
    message = f"{lead}. {error.message}"
    return OpenAIError(400, message, param=error.param, code="context_length_exceeded")


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@dataclass(frozen=True)
class Envelope:
    """The fields every object of one response shares; `created` is the request's time, the
    same in each chunk of a stream (as OpenAI and vLLM)."""

    kind: str
    request_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def __call__(self, **rest: Any) -> dict[str, Any]:
        head = {"id": self.request_id, "object": self.kind, "created": self.created}
        return {**head, "model": self.model, **rest}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def results_usage(results: list[tuple[list[int], list[Any]]]) -> dict[str, int]:
    """The usage of (prompt ids, choices) results (``streams.collect``'s)."""
    return usage(
        sum(len(p) for p, _ in results), sum(len(c.token_ids) for _, cs in results for c in cs)
    )


def chunk_usage(body: Any, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A content chunk's usage field: with include_usage null (as OpenAI), or with vLLM's
    continuous_usage_stats this choice's usage so far; absent otherwise."""
    if body.continuous_usage:
        return {"usage": usage(prompt_tokens, completion_tokens)}
    return {"usage": None} if body.include_usage else {}


def finish(done: Any, tool_calls: bool = False) -> dict[str, Any]:
    """A choice's finish_reason and, as vLLM, stop_reason: the stop string or stop token id
    that ended it (None for EOS or a length limit, and while it runs). A choice whose
    ``tool_calls`` were parsed finished with "tool_calls", as vLLM's (a length limit too)."""
    if done is None:
        return {"finish_reason": None, "stop_reason": None}
    reason = "tool_calls" if tool_calls else done.finish_reason
    return {"finish_reason": reason, "stop_reason": done.stop_reason}


class TokenDecoder:
    """A token's text as it reads inside a completion (``decode(tid)``), the token as
    logprobs name it (``decode.token(tid)``), and that name's bytes (``decode.bytes(tid)``,
    OpenAI's chat logprobs ``bytes``: a piece of a multi-byte character reads as U+FFFD
    alone, but its bytes rebuild the character when joined).

    Decoded alone, a SentencePiece token (Llama 2, Mistral) loses its leading space: the
    decoder strips the start of the text. So each token is decoded after an anchor token
    and the anchor's text is cut off again.

    ``as_ids`` (vLLM's return_tokens_as_token_ids): logprobs name each token
    "token_id:{tid}", which maps back to its id even where its text does not (a piece of
    a character, a text several ids share); the text itself is unchanged.
    """

    def __init__(self, tokenizer: Any, as_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        self.cache: dict[int, str] = {}
        if tokenizer is not None:
            self.anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
            self.head = tokenizer.decode(self.anchor)

    def __call__(self, tid: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{tid}"
        if tid not in self.cache:
            text = self.tokenizer.decode([*self.anchor, tid])
            head = self.head
            self.cache[tid] = (
                text[len(head) :] if text.startswith(head) else self.tokenizer.decode([tid])
            )
        return self.cache[tid]

    def token(self, tid: int) -> str:
        return f"token_id:{tid}" if self.as_ids else self(tid)

    @functools.cached_property
    def piece_bytes(self):  # only for chat logprobs: not built for every request
        return piece_bytes(self.tokenizer)

    def bytes(self, tid: int) -> bytes:
        # NOTE: a token named by id has its name's bytes, so token and bytes agree (vLLM
        # gives top_logprobs these, but the sampled token its text's bytes)
        raw = self.piece_bytes(tid) if self.tokenizer is not None and not self.as_ids else None
        return self.token(tid).encode("utf-8") if raw is None else raw


def _ranked(logprobs: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda kv: -kv[1])


def completion_logprobs(
    decode: TokenDecoder,
    token_ids: list[int],
    logprobs: list[dict[int, float]],
    offset: int = 0,
) -> dict[str, Any]:
    """Legacy completions format: tokens, token_logprobs, top_logprobs, text_offset.

    Each top_logprobs dict holds what the engine listed: the `logprobs` most likely tokens
    and the sampled one (up to logprobs + 1 entries, as OpenAI's legacy API and vLLM).
    text_offset counts the tokens' text, also when they are named by id (vLLM counts the
    "token_id:" names, which are not in the text).
    """
    offsets = []
    for t in token_ids:
        offsets.append(offset)
        offset += len(decode(t))
    return {
        "tokens": [decode.token(t) for t in token_ids],
        "token_logprobs": [lp.get(t) for t, lp in zip(token_ids, logprobs, strict=False)],
        "top_logprobs": [{decode.token(t): v for t, v in _ranked(lp)} for lp in logprobs],
        "text_offset": offsets,
    }


def chat_logprobs(
    decode: TokenDecoder, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int
) -> dict[str, Any]:
    """Chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}; here
    top_logprobs are the `top_n` most likely tokens only (the sampled one may not be among them)."""

    def entry(tid: int, lp: float | None) -> dict[str, Any]:
        return {"token": decode.token(tid), "logprob": lp, "bytes": list(decode.bytes(tid))}

    return {
        "content": [
            {**entry(t, lp.get(t)), "top_logprobs": [entry(k, v) for k, v in _ranked(lp)[:top_n]]}
            for t, lp in zip(token_ids, logprobs, strict=False)
        ]
    }
