"""vLLM's tokenizer routes and probes on the OpenAI app: ``POST /tokenize`` (a prompt, or chat
messages through the model's template), ``POST /detokenize``, ``GET /health``, ``GET
/version``. Errors are answered in OpenAI's shape by the app's handlers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from importlib import metadata
from typing import Annotated, Any

from fastapi import FastAPI, Response
from jinja2 import TemplateError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from vllm_runner.serving import openai_format as fmt
from vllm_runner.serving.chat_options import bounded_template, check_trusted, render
from vllm_runner.serving.chat_protocol import (
    ChatMessage,
    Tool,
    bounded_tools,
    check_tool_names,
    template_tools,
)


class TokenizeRequest(BaseModel):
    """vLLM's two forms: ``prompt`` (special tokens added by default), or ``messages``
    rendered by the chat template (none added by default: the template holds them)."""

    model_config = ConfigDict(extra="ignore")  # as the OpenAI routes

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # as the chat route's: instead of the model's, under trust_request_chat_template
    chat_template: Annotated[str | None, BeforeValidator(bounded_template)] = None
    tools: list[Tool] | None = None  # for the template, as the chat route's
    return_token_strs: bool = False

    @field_validator("tools", mode="before")
    @classmethod
    def _few_tools(cls, value: Any) -> Any:
        return bounded_tools(value)

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        check_tool_names(self.tools)
        if (self.prompt is None) == (self.messages is None):
            given = "both" if self.prompt is not None else "neither"
            raise ValueError(f"send either prompt or messages, got {given}")
        if self.tools and self.messages is None:
            raise ValueError(
                "tools: only with messages (the chat template renders them), got "
                f"{len(self.tools)} with a prompt"
            )
        if self.chat_template is not None and self.messages is None:
            raise ValueError("chat_template: only with messages, got one with a prompt")
        if self.add_generation_prompt and self.continue_final_message and self.messages:
            raise ValueError(
                "continue_final_message needs add_generation_prompt: false, got True with "
                "add_generation_prompt True"
            )
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def _version() -> str:
    try:
        return metadata.version("vllm-runner")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def add_tokenize_routes(
    app: FastAPI, engine_for: Callable[[str | None], Any], get_engine: Callable[[], Any]
) -> None:
    """``engine_for(model)``: the engine if ``model`` names it (else a 404);
    ``get_engine()``: the running engine or EngineNotReady (a 503)."""

    def tokenize(engine: Any, body: TokenizeRequest) -> list[int]:
        # special tokens (None: the default) for a prompt unless told not, for messages only
        # if told (the template holds them); chat=True tokenizes without them
        if body.messages is None:
            return engine.inputs.tokenize(body.prompt, chat=body.add_special_tokens is False)
        options = {
            "add_generation_prompt": body.add_generation_prompt,
            "continue_final_message": body.continue_final_message,
            "template_kwargs": body.chat_template_kwargs,
            "tools": template_tools(body.tools),
            "chat_template": body.chat_template,
        }
        text = render(engine, [m.as_dict() for m in body.messages], options)
        return engine.inputs.tokenize(text, chat=not body.add_special_tokens)

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> dict[str, Any]:
        """The prompt's token ids as the engine would run them, and their count; a prompt
        longer than max_model_len is counted too (as vLLM's)."""
        engine = engine_for(body.model)
        param = "prompt" if body.messages is None else "messages"
        try:  # in a thread, as the routes that generate: a long text tokenizes for a while
            check_trusted(body.chat_template, app.state.trust_request_chat_template)
            ids = await asyncio.to_thread(tokenize, engine, body)
        except (ValueError, TypeError, TemplateError) as exc:
            raise fmt.bad_request(ValueError(str(exc)), param, {"chat_template"}) from None
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                "token_strs": strs}  # fmt: skip

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> dict[str, str]:
        engine = engine_for(body.model)
        if engine.tokenizer is None:
            raise fmt.OpenAIError(400, "this model has no tokenizer: there is no text for ids")
        vocab = len(engine.tokenizer)
        bad = next((t for t in body.tokens if t >= vocab), None)
        if bad is not None:
            raise fmt.OpenAIError(
                400, f"tokens: id {bad} is not in the vocabulary (ids < {vocab})", param="tokens"
            )
        return {"prompt": await asyncio.to_thread(engine.tokenizer.decode, body.tokens)}

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine runs; 503 while it loads or after it died (as vLLM's)."""
        get_engine()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": _version()}
