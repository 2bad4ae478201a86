"""OpenAI-compatible routes (FastAPI): /v1/models, /v1/completions, /v1/chat/completions,
/v1/embeddings (embeddings_api.py) and vLLM's /tokenize, /detokenize, /health, /version
(tokenize_api.py).

`create_openai_app(get_engine)` builds the app; `get_engine()` returns the
running AsyncLLM or raises `EngineNotReady`. Every error is answered in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from vllm_runner.async_llm import EngineDeadError
from vllm_runner.engine.errors import ContextLengthError
from vllm_runner.lora.request import LoRARequest
from vllm_runner.sampling_params import SamplingParams
from vllm_runner.serving import beam_route
from vllm_runner.serving import completions as completions_api
from vllm_runner.serving import openai_format as fmt
from vllm_runner.serving.chat_options import check_trusted, echoed, render
from vllm_runner.serving.embeddings_api import add_embedding_routes
from vllm_runner.serving.forced_tools import forced_calls, forced_message, forces
from vllm_runner.serving.models_api import ServedModels, add_model_routes
from vllm_runner.serving.prompt_logprobs import prompt_logprobs_field
from vllm_runner.serving.protocol import ChatCompletionRequest, CompletionRequest
from vllm_runner.serving.reasoning_parsers import (
    Reasoned,
    ReasoningParser,
    ReasoningStream,
    get_reasoning_parser,
    guided,
)
from vllm_runner.serving.streams import events, gather, new_request_id, until_disconnect
from vllm_runner.serving.tokenize_api import add_tokenize_routes
from vllm_runner.serving.tool_formats import get_tool_parser
from vllm_runner.serving.tool_parsers import ToolCallStream, ToolParser, chat_message, parser_for
from vllm_runner.serving.unsupported import UNSUPPORTED, UNSUPPORTED_CHAT, UNSUPPORTED_COMPLETION

logger = logging.getLogger(__name__)
# the fields an error message may name first (its "param"), per route
_COMMON = {*UNSUPPORTED, "tool_choice", "best_of", "structured_outputs"}
_COMPLETION_FIELDS = {*CompletionRequest.model_fields, *UNSUPPORTED_COMPLETION, *_COMMON}
_CHAT_FIELDS = {*ChatCompletionRequest.model_fields, *UNSUPPORTED_CHAT, *_COMMON}
_FIELDS = _COMPLETION_FIELDS | _CHAT_FIELDS
_SHOWN_INPUT = 80  # characters of a refused value quoted back
_SHOWN_MESSAGE = 400  # characters of a validator's message (its value comes last)
_SEND_JSON = "send a JSON object with content-type application/json"


class EngineNotReady(RuntimeError):
    """The engine is still loading (or failed to load): answered with 503."""


def _validation_error(
    exc: RequestValidationError, content_type: str | None = None
) -> fmt.OpenAIError:
    errors = exc.errors() or [{"loc": (), "msg": "invalid request"}]

    if tuple(errors[0].get("loc", ())) == ("body",):  # the body as a whole, not a field
        if errors[0].get("type") == "missing":
            return fmt.OpenAIError(400, f"the request has no body: {_SEND_JSON}")
        if isinstance(errors[0].get("input"), bytes):  # FastAPI read it as JSON only if so typed
            got = repr(content_type[:_SHOWN_INPUT]) if content_type else "no content-type"
            return fmt.OpenAIError(400, f"the body was not read as JSON: {_SEND_JSON}, got {got}")
    if errors[0].get("type") == "json_invalid":
        position = errors[0].get("loc", ("body", "?"))[-1]
        error = errors[0].get("ctx", {}).get("error", "")
        return fmt.OpenAIError(400, f"the body is not valid JSON (character {position}): {error}")

    def text(e: dict) -> str:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        msg = str(e.get("msg")).removeprefix("Value error, ")  # a validator's own message
        if len(msg) > _SHOWN_MESSAGE:  # e.g. it quotes a megabyte of refused value back
            msg = msg[:_SHOWN_MESSAGE] + "..."
        if "input" in e and e.get("type") not in ("missing", "value_error"):
            shown = repr(e["input"])  # pydantic's limits name the limit, not the value
            if len(shown) > _SHOWN_INPUT:
                shown = shown[:_SHOWN_INPUT] + "..."
            msg = f"{msg}, got {shown}"
        return f"{where}: {msg}" if where else msg

    message = "; ".join(text(e) for e in errors)
    loc = [str(p) for p in errors[0].get("loc", ()) if p != "body"]
    if loc:
        return fmt.OpenAIError(400, message, param=loc[0])
    # a rule across fields (min_tokens <= max_tokens, ...): its message starts with the field
    return fmt.bad_request(ValueError(message), None, _FIELDS)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(fmt.OpenAIError)
    async def _openai(_: Request, exc: fmt.OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc, request.headers.get("content-type")).response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return fmt.OpenAIError(exc.status_code, str(exc.detail), "invalid_request_error").response()

    @app.exception_handler(EngineNotReady)
    async def _not_ready(_: Request, exc: EngineNotReady) -> JSONResponse:
        return fmt.OpenAIError(
            503, str(exc), "service_unavailable", None, "model_not_ready"
        ).response()

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return fmt.OpenAIError(503, str(exc), "service_unavailable", None, "engine_dead").response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return fmt.OpenAIError(500, f"internal error: {exc}", "internal_server_error").response()


def create_openai_app(
    get_engine: Callable[[], Any],
    tool_call_parser: str | None = None,
    reasoning_parser: str | None = None,
    *,
    trust_request_chat_template: bool = False,
    lora_modules: Sequence[LoRARequest] = (),
    allow_runtime_lora_updating: bool = False,
) -> FastAPI:
    """``tool_call_parser``, ``reasoning_parser``: the server settings (keys of
    ``tool_formats.TOOL_PARSERS``, ``REASONING_PARSERS``; None: off), kept as
    ``app.state.tool_parser``, ``app.state.reasoning_parser``; ``trust_request_chat_template``:
    the server setting (chat requests may bring their own template), kept as
    ``app.state.trust_request_chat_template``; ``lora_modules``, ``allow_runtime_lora_updating``:
    the adapters served by name, and whether routes may change them (``app.state.models``)."""
    app = FastAPI(title="vllm-runner OpenAI-compatible API")
    app.state.tool_parser = get_tool_parser(tool_call_parser)
    app.state.reasoning_parser = get_reasoning_parser(reasoning_parser)
    app.state.trust_request_chat_template = trust_request_chat_template
    _install_error_handlers(app)

    app.state.models = models = ServedModels(get_engine, lora_modules, allow_runtime_lora_updating)
    engine_for = models.engine_for

    async def validate(
        engine: Any,
        prompt: str | list[int],
        params: SamplingParams,
        param: str,
        fields: set[str],
        chat: bool = False,
        as_sent: Callable[[str], str] = str,
    ) -> tuple[list[int], SamplingParams]:
        """The prompt's ids, and ``params`` with a missing max_tokens fitted to them."""
        try:  # in a thread: a long prompt's tokenization would hold every other stream
            ids = await asyncio.to_thread(engine.validate, prompt, params, chat, fit=True)
            return ids, engine.inputs.fit(ids, params)
        except ValueError as exc:
            error = fmt.bad_request(ValueError(as_sent(str(exc))), param, fields)
            if isinstance(exc, ContextLengthError):
                error = fmt.context_length(error, exc.max_model_len)
            raise error from None

    async def beam_answer(engine, body, ids, max_tokens, env, request, fields) -> Any:
        """``max_tokens``: each prompt's (its own, or the one fitted to it)."""
        chat = isinstance(body, ChatCompletionRequest)
        reasoner = app.state.reasoning_parser if chat else None
        try:
            beams = [beam_route.beam_params(body, m) for m in max_tokens]
            return await beam_route.answer(
                engine, body, ids, beams, env, request.receive, chat, reasoner
            )
        except ValueError as exc:  # (its settings, or the search's length: before any round)
            error = fmt.bad_request(exc, "use_beam_search", fields)
            if isinstance(exc, ContextLengthError):
                error = fmt.context_length(error, exc.max_model_len)
            raise error from None

    add_model_routes(app, models)

    @app.get("/stats")
    async def engine_stats() -> dict[str, Any]:
        """The engine's scheduler and KV-cache counters (this worker)."""
        return get_engine().stats()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        engine = engine_for(body.model)
        try:
            params = body.completion_sampling_params(engine.inputs.limits.sampling_defaults)
            engine.inputs.check_priority(body.priority)  # (a 400 under "fcfs" unless 0)
        except ValueError as exc:
            raise fmt.bad_request(exc, "prompt", _COMPLETION_FIELDS) from None
        checked = [
            await validate(engine, p, params, "prompt", _COMPLETION_FIELDS) for p in body.prompts()
        ]
        ids, each = [i for i, _ in checked], [p for _, p in checked]
        env = fmt.Envelope("text_completion", new_request_id("cmpl"), engine.model_name)
        if body.use_beam_search:  # (each prompt's max_tokens: a null one fitted to it, as vLLM's)
            rooms = [p.max_tokens for p in each]
            return await beam_answer(engine, body, ids, rooms, env, request, _COMPLETION_FIELDS)
        if body.stream:
            return fmt.sse_response(completions_api.stream(engine, body, ids, each, env))
        return await completions_api.answer(engine, body, ids, each, env, request.receive)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        engine = engine_for(body.model)
        try:
            check_trusted(body.chat_template, app.state.trust_request_chat_template)
            params = body.chat_sampling_params(engine.inputs.limits.sampling_defaults)
            engine.inputs.check_priority(body.priority)
            parser = None  # (a forced call is guided, then read: forced_tools.py)
            if not forces(body.tool_choice):
                parser = parser_for(
                    app.state.tool_parser, bool(body.tools), body.tool_choice, body.use_beam_search
                )
            if parser is not None and parser.keeps_special_tokens:
                params.skip_special_tokens = False  # (the calls' opening token, as vLLM's)
            messages = [m.as_dict() for m in body.messages]
            # NOTE: in a thread, as tokenizing: a long conversation renders for seconds
            options = body.template_options()
            prompt = await asyncio.to_thread(render, engine, messages, options)
        except (ValueError, TypeError, TemplateError) as exc:  # templates raise on roles
            message = body.as_sent(str(exc))
            raise fmt.bad_request(ValueError(message), "messages", _CHAT_FIELDS) from None
        # the prompt is the templated messages: errors about it name "messages"
        fields = _CHAT_FIELDS - {"prompt"}
        ids, params = await validate(engine, prompt, params, "messages", fields, True, body.as_sent)
        rid = new_request_id("chatcmpl")
        if body.use_beam_search:
            env = fmt.Envelope("chat.completion", rid, engine.model_name)
            return await beam_answer(engine, body, [ids], [params.max_tokens], env, request, fields)
        decode = fmt.TokenDecoder(engine.tokenizer, body.return_tokens_as_token_ids)
        reasoner = app.state.reasoning_parser
        if body.stream:
            env = fmt.Envelope("chat.completion.chunk", rid, engine.model_name)
            stream = _stream_chat(engine, ids, params, env, body, decode, parser, reasoner)
            return fmt.sse_response(stream)
        env = fmt.Envelope("chat.completion", rid, engine.model_name)
        results = await until_disconnect(
            request.receive, gather(engine, [ids], [params], rid, body.priority)
        )
        if results is None:
            return fmt.CLIENT_GONE.response()
        choices = [_chat_choice(c, body, decode, parser, reasoner, params) for c in results[0][1]]
        if body.prompt_logprobs is None:
            return env(choices=choices, usage=fmt.results_usage(results))
        first = results[0][1][0]  # (vLLM's: the response's, once for its n choices)
        field = prompt_logprobs_field(
            decode, ids, first.prompt_logprobs, first.prompt_ranks, body.prompt_logprobs
        )
        return env(choices=choices, usage=fmt.results_usage(results), prompt_logprobs=field)

    add_tokenize_routes(app, engine_for, get_engine)
    add_embedding_routes(app, engine_for)
    return app


def _chat_choice(
    c: Any,
    body: ChatCompletionRequest,
    decode: fmt.TokenDecoder,
    parser: ToolParser | None,
    reasoner: ReasoningParser | None,
    params: SamplingParams,
) -> dict[str, Any]:
    # tool calls are read in the content only (a guided output is all content)
    split = Reasoned(None, c.text)
    if reasoner is not None and not guided(params):
        split = reasoner.split(c.text)
    if forces(body.tool_choice):  # (named: "stop", as vLLM's; "required": "tool_calls")
        message = forced_message(c.text, body.tool_choice)
        calls = "tool_calls" in message and body.tool_choice == "required"
    else:
        message = chat_message(split.content, parser, body.tool_names())
        calls = "tool_calls" in message
    if reasoner is not None:  # (null too: as vLLM's, every message of such a server has it)
        message["reasoning_content"] = split.reasoning
    lps = None
    if body.logprobs:
        lps = fmt.chat_logprobs(decode, c.token_ids, c.logprobs, body.top_logprobs or 0)
    if body.echo:  # (vLLM's: then the content is text, if only the echo)
        echo = echoed(body.messages, body.add_generation_prompt)
        message["content"] = echo + (message["content"] or "")
    finish = fmt.finish(c, calls)
    return {"index": c.index, "message": message, "logprobs": lps, **finish}


async def _stream_chat(
    engine: Any,
    ids: list[int],
    params: SamplingParams,
    env: fmt.Envelope,
    body: ChatCompletionRequest,
    decode: fmt.TokenDecoder,
    parser: ToolParser | None,
    reasoner: ReasoningParser | None,
) -> AsyncIterator[str]:
    generated: dict[int, int] = {}
    # each choice's text split into reasoning and content (with a reasoning parser; a guided
    # output is all content), then the content watched for tool calls: content stops at a call
    reads = reasoner is not None and not guided(params)
    reading = {i: ReasoningStream(reasoner) for i in range(params.n) if reads}
    watched = {i: ToolCallStream(parser, body.tool_names()) for i in range(params.n) if parser}
    # a forced call's text is held back and sent as its calls when the choice ends
    held: dict[int, str] | None = {} if forces(body.tool_choice) else None

    def chunk(
        index: int, delta: dict[str, Any], finished: Any = None, logprobs: Any = None,
        tool_calls: bool = False,
    ) -> str:  # fmt: skip
        choice = {"index": index, "delta": delta, "logprobs": logprobs}
        usage = fmt.chunk_usage(body, len(ids), generated.get(index, 0))
        choice.update(fmt.finish(finished, tool_calls))
        return fmt.sse(env(choices=[choice], **usage))

    try:
        for i in range(params.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        echo = echoed(body.messages, body.add_generation_prompt) if body.echo else ""
        for i in range(params.n if echo else 0):  # (vLLM's: each choice's, after the roles)
            yield chunk(i, {"content": echo})
        async for _, out in events(engine, [ids], [params], env.request_id, body.priority):
            generated[out.index] = out.num_token_ids
            lps = None
            if body.logprobs and out.new_logprobs:
                lps = fmt.chat_logprobs(
                    decode, out.new_token_ids, out.new_logprobs, body.top_logprobs or 0
                )
            read, watch = reading.get(out.index), watched.get(out.index)
            part = read.feed(out.delta) if read else Reasoned("", out.delta)
            content = watch.feed(part.content) if watch else part.content
            if held is not None:
                held[out.index] = held.get(out.index, "") + content
                content = ""
            if content or part.reasoning or lps:
                yield chunk(out.index, _delta(part.reasoning, content), logprobs=lps)
            if out.finished:
                calls: list[Any] = []
                last = read.finish() if read else Reasoned("", "")
                rest = last.content
                if watch:  # (the content the reasoning stream held back, then the calls)
                    rest = watch.feed(rest) if rest else ""
                    more, calls = watch.finish()
                    rest += more
                elif held is not None:
                    calls = forced_calls(held.get(out.index, ""), body.tool_choice)
                    rest = "" if calls else held.get(out.index, "")
                if rest or last.reasoning:
                    yield chunk(out.index, _delta(last.reasoning, rest))
                for k, call in enumerate(calls):
                    yield chunk(out.index, {"tool_calls": [call.delta(k)]})
                named = held is not None and body.tool_choice != "required"
                yield chunk(out.index, {}, out, tool_calls=bool(calls) and not named)
        if body.include_usage:
            usage = fmt.usage(len(ids), sum(generated.values()))
            yield fmt.sse(env(choices=[], usage=usage))
    except Exception as exc:  # headers are sent: report in-band, as OpenAI does
        logger.exception("stream %s failed", env.request_id)
        yield fmt.sse(fmt.OpenAIError(500, str(exc), "internal_server_error").body())
    yield fmt.DONE


def _delta(reasoning: str | None, content: str) -> dict[str, Any]:
    """A chunk's delta: its reasoning, if any, and its content (or "", when it has neither:
    a chunk for logprobs alone)."""
    delta = {"reasoning_content": reasoning} if reasoning else {}
    return {**delta, "content": content} if content or not delta else delta
