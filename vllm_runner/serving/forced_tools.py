"""A ``tool_choice`` that forces a call (vLLM's): a named function, whose arguments object is
the whole output, or ``"required"``, whose output is a JSON list of one call or more,
``[{"name": ..., "parameters": {...}}, ...]``. Either way the output is guided by a JSON
schema (``guided_json``) built from the tools' ``parameters``, so every call names a declared
function and its arguments are what that function's schema allows (within what
``sample/json_schema.py`` compiles), and the text is read back as OpenAI's ``tool_calls``.
"""

from __future__ import annotations

import json
from typing import Any

from vllm_runner.serving.tool_parsers import ToolCall

ANY_OBJECT = {"type": "object"}  # a function declared without parameters: any object


def forces(tool_choice: Any) -> bool:
    return tool_choice == "required" or isinstance(tool_choice, dict)


def forced_name(tool_choice: Any) -> str | None:
    """The function a named choice forces (None for "required" and the others)."""
    return tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None


def forced_params(tool_choice: Any, tools: list[Any] | None) -> dict[str, Any]:
    """The sampling field a forced call adds (none for the other choices)."""
    return {"guided_json": forced_schema(tool_choice, tools or [])} if forces(tool_choice) else {}


def forced_schema(tool_choice: Any, tools: list[Any]) -> dict[str, Any]:
    """The schema the output is guided by (``tools``: the request's, with the named one)."""
    parameters = {t.function.name: t.function.parameters or ANY_OBJECT for t in tools}
    name = forced_name(tool_choice)
    if name is not None:
        return parameters[name]
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": n}, "parameters": schema},
            "required": ["name", "parameters"],
        }
        for n, schema in parameters.items()
    ]
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}


def forced_calls(text: str, tool_choice: Any) -> list[ToolCall]:
    """The calls in a forced output. A named call's arguments are the text as generated (as
    vLLM's: cut by max_tokens, not JSON); a "required" list cut short has none."""
    name = forced_name(tool_choice)
    if name is not None:
        return [ToolCall(name, text)]
    try:
        calls = json.loads(text)
    except ValueError:
        return []
    return [
        ToolCall(call["name"], json.dumps(call["parameters"], ensure_ascii=False)) for call in calls
    ]


def forced_message(text: str, tool_choice: Any) -> dict[str, Any]:
    """A whole choice's message: its calls and no content (the text if none was whole)."""
    calls = forced_calls(text, tool_choice)
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": None, "tool_calls": [c.as_dict() for c in calls]}
