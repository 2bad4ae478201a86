"""BentoML service for vllm-runner: one AsyncLLM per worker behind native and OpenAI routes.

    bentoml serve                         # default model, settings from VLLM_RUNNER_* env vars
    bentoml serve --arg max_model_len=2048 --arg api_key=secret

Native routes: POST /generate (streamed text), POST /complete and POST /score (adaptive
batching: each batch BentoML forms goes to the engine in one call). OpenAI routes (/v1/...)
live in vllm_runner/serving/openai_api.py on a mounted FastAPI app. This file only adapts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncGenerator
from typing import Any

import bentoml
from bentoml.exceptions import BentoMLException, InvalidArgument, ServiceUnavailable
from pydantic import PrivateAttr, ValidationError, model_validator

from vllm_runner import AsyncLLM, RequestError
from vllm_runner.async_llm import EngineDeadError
from vllm_runner.serving.auth import ApiKeyMiddleware
from vllm_runner.serving.batched import (
    complete_result,
    fitted_params,
    generate_valid,
    prepared,
    score_ids,
    score_params,
    score_result,
    short_texts,
)
from vllm_runner.serving.live_gauges import LiveGaugesMiddleware
from vllm_runner.serving.openai_api import EngineNotReady, create_openai_app
from vllm_runner.serving.protocol import (
    CompleteRequest,
    CompleteResult,
    GenerateRequest,
    ScoreRequest,
    ScoreResult,
)
from vllm_runner.serving.settings import ServerSettings
from vllm_runner.serving.streams import new_request_id, stream_or_abort, until_disconnect

logger = logging.getLogger("vllm_runner.service")
try:
    SETTINGS = ServerSettings.load(os.environ, vars(bentoml.use_arguments()), sys.argv)
except ValueError as exc:
    # NOTE: loading a bento by tag, BentoML (1.4) reads a ValueError as "not a bento tag"
    # and says "No module named '<tag>'" instead: BentoML's own error shows the message.
    raise InvalidArgument(str(exc)) from None


def _service() -> Any | None:
    try:
        return bentoml.get_current_service()
    except BentoMLException:  # not inside a running server (e.g. a client building inputs)
        return None


def ready_engine() -> AsyncLLM:
    """The running engine of this worker, or EngineNotReady (-> 503)."""
    svc = _service()
    if svc is None or svc.engine is None or svc.engine.error is not None:
        raise EngineNotReady(svc.not_ready_reason() if svc else "the service is starting")
    return svc.engine


def _engine_at_parse_time() -> AsyncLLM | None:
    # NOTE: BentoML parses each request before it joins an adaptive batch; checking prompts
    # here makes a bad one a 400 of its own instead of failing everyone in its batch.
    if _service() is None:
        return None
    try:
        return ready_engine()
    except EngineNotReady as exc:
        raise ServiceUnavailable(str(exc)) from None


def request_error(model: type, exc: ValueError) -> ValidationError:
    """A request the engine refuses, answered as BentoML answers a parse-time validator's
    error: 400 {"error", "detail": [{"msg", ...}]} (its 4xx exceptions come as a list)."""
    error = {"type": "value_error", "loc": (), "input": None, "ctx": {"error": exc}}
    return ValidationError.from_exception_data(model.__name__, [error])


def _error_body(ctx: bentoml.Context, status: int, exc: Exception) -> str:
    """A stream's failure before its first chunk, answered as BentoML answers its own errors
    (status, and {"error": message} in JSON). NOTE: BentoML hides the message of a raised
    5xx; until the first chunk the status and headers are still ours to set."""
    ctx.response.status_code = status
    ctx.response.metadata["content-type"] = "application/json"
    return json.dumps({"error": str(exc)})


class CompleteInput(CompleteRequest):
    _ids: list[int] | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _fits_engine(self) -> CompleteInput:
        if engine := _engine_at_parse_time():
            params = self.sampling_params(engine.inputs.limits.sampling_defaults)
            engine.inputs.check_priority(self.priority)
            if short_texts(self.prompt):
                self._ids = engine.validate(self.prompt, params, fit=True)
            elif params.truncate_prompt_tokens is None:  # (a cut text may be any length)
                engine.check_text_length(self.prompt, "prompt")
        return self


class ScoreInput(ScoreRequest):
    _ids: tuple[list[int], int] | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _fits_engine(self) -> ScoreInput:
        if engine := _engine_at_parse_time():
            if short_texts(self.prompt, self.continuation):
                self._ids = score_ids(engine, self)
            else:
                for name in ("prompt", "continuation"):
                    if isinstance(text := getattr(self, name), str):
                        engine.check_text_length(text, name)
        return self


openai_app = create_openai_app(
    ready_engine,
    SETTINGS.tool_call_parser,
    SETTINGS.reasoning_parser,
    trust_request_chat_template=SETTINGS.trust_request_chat_template,
    lora_modules=SETTINGS.lora_requests(),
    allow_runtime_lora_updating=SETTINGS.allow_runtime_lora_updating,
)
_service_options: dict[str, Any] = {
    "workers": SETTINGS.workers,
    "traffic": {"timeout": SETTINGS.timeout, "max_concurrency": SETTINGS.max_concurrency},
}
if SETTINGS.gpus:
    _service_options["resources"] = {"gpu": SETTINGS.gpus}
_batching = {
    "batchable": True,
    "max_batch_size": SETTINGS.max_batch_size,
    "max_latency_ms": SETTINGS.max_latency_ms,
}


@bentoml.asgi_app(openai_app, path="/")
@bentoml.service(**_service_options)
class LLMService:
    """vllm-runner behind BentoML: streaming, batched and OpenAI-compatible generation."""

    def __init__(self) -> None:
        self.engine: AsyncLLM | None = None
        self.load_error: BaseException | None = None
        self._loader: asyncio.Task[None] | None = None

    @bentoml.on_startup
    async def start_loading(self) -> None:
        # Weights load in a thread: the worker answers /livez and /readyz (503) meanwhile.
        self._loader = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            engine = await asyncio.to_thread(
                AsyncLLM, model=SETTINGS.model, log_stats=True, **SETTINGS.engine_kwargs()
            )
            try:  # (lora_modules: an adapter this engine cannot run stops it now)
                openai_app.state.models.check(engine)
            except ValueError:
                await engine.shutdown()
                raise
            self.engine = engine
        except Exception as exc:
            self.load_error = exc
            logger.exception("loading the model failed")
        else:
            logger.info(
                "model %s ready (max_model_len %d)",
                self.engine.model_name,
                self.engine.max_model_len,
            )

    def not_ready_reason(self) -> str:
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        if self.engine is not None and self.engine.error is not None:
            return f"the engine stopped: {self.engine.error}"
        return "the model is still loading"

    def __is_ready__(self) -> bool:
        return self.engine is not None and self.engine.error is None

    def __is_alive__(self) -> bool:
        # NOTE: an engine whose loop stopped on its own (its process died) fails /livez, so
        # that an orchestrator probing it restarts the server (BentoML itself does not).
        return self.load_error is None and (self.engine is None or self.engine.error is None)

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        # BentoML calls this after in-flight requests (and streams) have finished.
        if self._loader is not None:
            await asyncio.gather(self._loader, return_exceptions=True)
        if self.engine is not None:
            await self.engine.shutdown()

    def _engine(self) -> AsyncLLM:
        if self.engine is None or self.engine.error is not None:
            raise ServiceUnavailable(self.not_ready_reason())
        return self.engine

    @bentoml.api
    async def generate(
        self, request: GenerateRequest, /, ctx: bentoml.Context
    ) -> AsyncGenerator[str, None]:
        """Generate from `prompt`, streaming the text as it is produced."""
        try:
            engine = self._engine()
        except ServiceUnavailable as exc:
            yield _error_body(ctx, 503, exc)
            return
        try:
            params = request.sampling_params(engine.inputs.limits.sampling_defaults)
            priority = engine.inputs.check_priority(request.priority)
            # in a thread: a long prompt's tokenization would hold every other stream
            prompt = await asyncio.to_thread(engine.validate, request.prompt, params, fit=True)
            params = fitted_params(engine, params, prompt)
        except ValueError as exc:
            raise request_error(GenerateRequest, exc) from None
        started = False
        outs = stream_or_abort(engine, prompt, params, new_request_id("gen"), priority)
        try:
            # BentoML awaits the first chunk before it streams, and nothing watches the
            # connection until then: a client that leaves while queued aborts its request.
            first = await until_disconnect(ctx.request.receive, anext(outs, None))
            if first is None:
                await outs.aclose()
                return
            if first.delta:
                started = True
                yield first.delta
            async for out in outs:
                if out.delta:
                    started = True
                    yield out.delta
        except (RequestError, EngineDeadError) as exc:
            if started:  # headers are sent: BentoML logs it and ends the stream
                raise
            yield _error_body(ctx, 503 if isinstance(exc, EngineDeadError) else 500, exc)

    async def _generate_batch(
        self, engine: AsyncLLM, inputs: list[Any], params: list[Any], priorities: list[int]
    ) -> list[Any]:
        try:
            return await generate_valid(engine, inputs, params, priorities)
        except EngineDeadError as exc:  # died under this batch: 503, as for the next batch
            raise ServiceUnavailable(f"the engine stopped: {exc}") from None

    @bentoml.api(**_batching)
    async def complete(self, requests: list[CompleteInput]) -> list[CompleteResult]:
        """Whole completions for a list of prompts (batched with concurrent callers)."""
        engine = self._engine()
        defaults = engine.inputs.limits.sampling_defaults
        params = [r.sampling_params(defaults) for r in requests]
        ids = await prepared(
            requests, lambda r: engine.validate(r.prompt, r.sampling_params(defaults), fit=True)
        )
        params = [fitted_params(engine, p, x) for p, x in zip(params, ids, strict=True)]
        priorities = [r.priority for r in requests]
        outs = await self._generate_batch(engine, ids, params, priorities)
        return [complete_result(o, prompt_ids) for o, prompt_ids in zip(outs, ids, strict=True)]

    @bentoml.api(**_batching)
    async def score(self, items: list[ScoreInput]) -> list[ScoreResult]:
        """Log-probability of each `continuation` right after its `prompt`."""
        engine = self._engine()
        inputs = await prepared(items, lambda item: score_ids(engine, item))
        ids = [x if isinstance(x, ValueError) else x[0] for x in inputs]
        outs = await self._generate_batch(
            engine, ids, [score_params() for _ in inputs], [0] * len(inputs)
        )
        return [score_result(out, x) for x, out in zip(inputs, outs, strict=True)]


LLMService.add_asgi_middleware(ApiKeyMiddleware, api_key=SETTINGS.api_key)
LLMService.add_asgi_middleware(LiveGaugesMiddleware)
