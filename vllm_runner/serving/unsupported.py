"""OpenAI / vLLM request fields that change the output and that this server does not
implement: a request using them is refused (a 400 naming the field and the value) rather
than answered as if they were absent."""

from __future__ import annotations

from typing import Any

# Each field maps to what it is and to the values that leave it unused.
# (values compared as pydantic would coerce them: 0, 0.0 and False are one value here)
_NONE = (None,)
_LIST = (None, [])
_FLAG = (None, False)
_KWARGS = (None, {})
UNSUPPORTED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "suffix": ("suffix", (None, "")),
    "response_format": (
        "structured output other than json_object and json_schema (response_format)",
        (None, {"type": "text"}),
    ),
    "functions": ("function calling (functions)", _LIST),
    "function_call": ("function calling (function_call)", (None, "none")),
    "logits_processors": ("logits_processors", _LIST),
    "spaces_between_special_tokens": ("spaces_between_special_tokens false", (None, True)),
    "prompt_embeds": ("prompt_embeds", _NONE),
}
# fields whose default differs between the routes
UNSUPPORTED_COMPLETION = {
    "add_special_tokens": ("add_special_tokens false", (None, True)),
    "tools": ("tool calling on /v1/completions (use /v1/chat/completions)", _LIST),
}
UNSUPPORTED_CHAT = {
    "add_special_tokens": ("add_special_tokens true", _FLAG),
    "documents": ("documents", _LIST),
    "mm_processor_kwargs": ("mm_processor_kwargs", _KWARGS),
}


def refuse_unsupported(data: dict[str, Any], table: dict[str, tuple[str, tuple[Any, ...]]]) -> None:
    for name, (feature, unused) in table.items():
        value = data.get(name)
        if name == "response_format" and isinstance(value, dict):  # a model in vLLM: its
            value = {k: v for k, v in value.items() if v is not None}  # nulls are defaults
        if not any(value == u for u in unused):  # as pydantic coerces: 0 == 0.0 == False
            raise ValueError(f"{name}: {feature} is not supported by this server, got {value!r}")
