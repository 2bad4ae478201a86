"""The chat route's messages and tools in OpenAI's shapes, validated at the edge, and what the
chat template gets of them: HF transformers' form (a tool call's arguments as a dict, each tool
as its JSON schema, as ``tokenizer.apply_chat_template(..., tools=...)`` takes them)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from vllm_runner.serving.forced_tools import forces

# NOTE: every tool is rendered into the request's prompt; OpenAI takes at most 128
MAX_TOOLS = 128
_SHOWN = 80  # characters of a refused value quoted back
# OpenAI's rule for a function's name
ToolName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: Annotated[str, Field(min_length=1)]
    arguments: str  # the arguments object as JSON text, as OpenAI sends it back

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            ok = isinstance(json.loads(value), dict)
        except (ValueError, RecursionError):  # (nesting deeper than Python's stack)
            ok = False
        if not ok:
            raise ValueError(f"must be a JSON object's text, got {_shown(value)}")
        return value


class ToolCallParam(BaseModel):
    """A tool call of an earlier assistant message, as clients send it back."""

    id: str
    type: Literal["function"]
    function: FunctionCall

    def as_template(self) -> dict[str, Any]:
        # NOTE: HF templates take the arguments as a dict (most render them with tojson)
        function = {"name": self.function.name, "arguments": json.loads(self.function.arguments)}
        return {"id": self.id, "type": "function", "function": function}


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool message's: the call it answers

    @model_validator(mode="before")
    @classmethod
    def _no_function_call(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("function_call") is not None:
            raise ValueError(
                "function_call: legacy function calling is not supported by this server (tool "
                f"calls are: tool_calls), got {_shown(data['function_call'])}"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(
                f"tool_calls: only an assistant message makes tool calls, got a {self.role} "
                f"message with {len(self.tool_calls)}"
            )
        # as OpenAI: only an assistant's message may leave its content out
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: a {self.role} message needs content, got none")
        return self

    def as_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):  # text parts are lines of one message, as in vLLM
            content = "\n".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if self.name is not None:  # templates that know names use them (as in vLLM)
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.as_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(BaseModel):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # held to ``parameters``: with a forced tool_choice only

    @model_validator(mode="after")
    def _object_parameters(self) -> FunctionDefinition:
        # NOTE: a call's arguments are an object (OpenAI: parameters is "a JSON Schema
        # object"); a schema of another type would guide a forced call to other arguments,
        # which this route refuses when the client sends the call back
        kind = (self.parameters or {}).get("type", "object")
        if kind != "object":
            raise ValueError(
                f"parameters: the function {self.name!r} takes its arguments as an object: its "
                f'schema\'s "type" must be "object" (or left out), got {_shown(kind)}'
            )
        return self


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition

    def as_template(self) -> dict[str, Any]:
        """The tool as sent, less the fields left out (templates test what is defined)."""
        f = self.function
        fields = {"name": f.name, "description": f.description, "parameters": f.parameters}
        return {"type": "function", "function": {k: v for k, v in fields.items() if v is not None}}


def template_tools(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """What ``apply_chat_template(..., tools=...)`` gets: None for no tools."""
    return [t.as_template() for t in tools] if tools else None


def bounded_tools(value: Any) -> Any:
    """A before-validator of ``tools``: at most MAX_TOOLS, refused before they are parsed."""
    if isinstance(value, list) and len(value) > MAX_TOOLS:
        raise ValueError(f"at most {MAX_TOOLS} tools, got {len(value)}")
    return value


def check_tool_names(tools: list[Tool] | None) -> None:
    """A call names its function: two of one name could not be told apart."""
    counts = Counter(t.function.name for t in tools or ())
    twice = [name for name, n in counts.items() if n > 1]
    if twice:
        raise ValueError(
            f"tools: each function needs a name of its own, got {twice[0]!r} "
            f"{counts[twice[0]]} times"
        )


def check_tool_choice(value: Any) -> None:
    """``"none"``, ``"auto"``, ``"required"`` or a named function (a call forced:
    ``forced_tools.py``); anything else is refused naming the shapes taken."""
    if value in (None, "none", "auto", "required"):
        return
    function = value.get("function") if isinstance(value, dict) else None
    if (
        isinstance(value, dict)
        and value.get("type") == "function"
        and set(value) == {"type", "function"}
        and isinstance(function, dict)
        and set(function) == {"name"}
        and isinstance(function["name"], str)
    ):
        return
    raise ValueError(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
        f'{{"name": ...}}}}, got {_shown(value)}'
    )


def check_forced_tools(tools: list[Tool] | None, tool_choice: Any, guided: list[str]) -> None:
    """A forced call needs tools and, named, one of them, and no other guided output
    (``guided``: the request's guided fields set); ``strict`` is kept only where the arguments
    are guided (a forced call) or no call is read ("none")."""
    forced = forces(tool_choice)
    if forced and guided:
        raise ValueError(
            f"tool_choice: a forced call's arguments are guided, which {guided[0]} (or the "
            "response_format / structured_outputs that set it) would take over"
        )
    names = [t.function.name for t in tools or ()]
    if forced and not names:
        raise ValueError(f"tool_choice: forcing a call needs tools, got {_shown(tool_choice)}")
    if isinstance(tool_choice, dict) and tool_choice["function"]["name"] not in names:
        raise ValueError(
            f"tool_choice: the function {tool_choice['function']['name']!r} is not among the "
            f"tools ({_shown(names)})"
        )
    strict = next((i for i, t in enumerate(tools or ()) if t.function.strict), None)
    if strict is not None and not forced and tool_choice != "none":
        raise ValueError(
            f"tools: tools.{strict}.function.strict holds the arguments to their schema only when "
            'tool_choice forces a call ("required" or a named function), got tool_choice '
            f"{_shown(tool_choice or 'auto')}"
        )
