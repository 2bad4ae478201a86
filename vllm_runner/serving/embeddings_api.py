"""OpenAI's ``POST /v1/embeddings`` on the OpenAI app: each input's vector, pooled by the
engine's ``pooler_config`` (the last token's final hidden state, L2-normalised, by default),
as floats or as base64 of little-endian float32 bytes (OpenAI's ``encoding_format``). The
inputs of one request run together: the engine batches them with whatever else it runs.
Errors are answered in OpenAI's shape by the app's handlers."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vllm_runner.engine.errors import ContextLengthError, RequestError
from vllm_runner.pooling_params import PoolingParams
from vllm_runner.sampling_params import INT64_MAX
from vllm_runner.serving import openai_format as fmt
from vllm_runner.serving.streams import new_request_id, until_disconnect

# OpenAI's own bound on one request's inputs; each is a request in the engine
MAX_EMBEDDING_INPUTS = 2048
TokenId = Annotated[int, Field(ge=0)]
_SHAPE = "a text, a list of texts, a list of token ids or a list of token-id lists"
_SHOWN = 40  # characters of a refused item quoted back


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


class EmbeddingRequest(BaseModel):
    """OpenAI's fields, and vLLM's ``truncate_prompt_tokens`` and ``priority``."""

    model_config = ConfigDict(extra="ignore")  # as the other OpenAI routes

    model: str | None = None
    # one text, texts, one prompt's token ids, or prompts' token ids
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None  # only the model's hidden size
    user: str | None = None  # (taken, as OpenAI's; not used)
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    priority: Annotated[int, Field(ge=-(2**63), le=INT64_MAX)] = 0

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        """Checked before pydantic parses it: bounded first, and one message naming the bad
        item (pydantic's would list every member of the union)."""
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(f"must be {_SHAPE}, got {type(value).__name__}")
        one = bool(value) and _is_id(value[0])  # one prompt's token ids
        if not one and len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs, got {len(value)}")
        if not one and all(isinstance(v, str) for v in value):
            return value
        for i, item in enumerate([value] if one else value):
            if not isinstance(item, list) or not all(_is_id(t) for t in item):
                raise ValueError(f"must be {_SHAPE}: input {i} is {_shown(item)}")
            bad = next((t for t in item if t < 0), None)
            if bad is not None:
                raise ValueError(f"token id {bad} (input {i}) must be >= 0")
        return value

    @field_validator("input")
    @classmethod
    def _none_empty(cls, value: Any) -> Any:
        if not value:
            raise ValueError(
                f"must not be empty: give a text, a list of texts or token ids, got {value!r}"
            )
        for i, item in enumerate(inputs_of(value)):
            if not item:
                raise ValueError(f"input {i} is empty ({item!r}): give at least one character "
                                 "or token id")  # fmt: skip
        return value

    def pooling_params(self) -> PoolingParams:
        return PoolingParams(
            dimensions=self.dimensions, truncate_prompt_tokens=self.truncate_prompt_tokens
        )


_FIELDS = set(EmbeddingRequest.model_fields)


def inputs_of(value: str | list) -> list[str | list[int]]:
    """The request's inputs, each a text or one prompt's token ids."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value]
    return list(value)


def encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def add_embedding_routes(app: FastAPI, engine_for: Callable[[str | None], Any]) -> None:
    """``engine_for(model)``: the engine if ``model`` names it (else a 404)."""

    def checked(engine: Any, inputs: list[str | list[int]], params: PoolingParams) -> list:
        """Each input's token ids, once every input passed the engine's checks."""
        ids = []
        for i, prompt in enumerate(inputs):
            try:
                ids.append(engine.validate(prompt, params))
            except ValueError as exc:  # (the prompt's own: its length, its token ids)
                where = f"input {i}: " if len(inputs) > 1 else ""
                error = fmt.OpenAIError(400, f"{where}{exc}", param="input")
                if isinstance(exc, ContextLengthError):
                    error = fmt.context_length(error, exc.max_model_len)
                raise error from None
        return ids

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
        engine = engine_for(body.model)
        try:
            params = body.pooling_params()
            engine.inputs.check_dimensions(params)
            engine.inputs.check_priority(body.priority)  # (a 400 under "fcfs" unless 0)
        except ValueError as exc:
            raise fmt.bad_request(exc, "input", _FIELDS) from None
        # in a thread: tokenizing many long texts would hold every other request up
        ids = await asyncio.to_thread(checked, engine, inputs_of(body.input), params)
        rid = new_request_id("embd")
        jobs = [engine.embed(p, params, f"{rid}-{i}", priority=body.priority)
                for i, p in enumerate(ids)]  # fmt: skip
        work = asyncio.gather(*jobs, return_exceptions=True)
        results = await until_disconnect(request.receive, work)
        if results is None:
            return fmt.CLIENT_GONE.response()
        for r in results:
            if isinstance(r, RequestError):  # this request alone failed; the engine runs on
                raise fmt.OpenAIError(500, str(r), "internal_server_error") from r
            if isinstance(r, BaseException):
                raise r
        data = [
            {"object": "embedding", "embedding": encoded(r.outputs.embedding, body.encoding_format),
             "index": i}
            for i, r in enumerate(results)
        ]  # fmt: skip
        tokens = sum(len(r.prompt_token_ids) for r in results)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return fmt.Envelope("list", rid, engine.model_name)(data=data, usage=usage)
