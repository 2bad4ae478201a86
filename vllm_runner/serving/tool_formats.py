"""The tool-call formats beside Hermes' (``tool_parsers.py``), and all of them by the names
vLLM's ``--tool-call-parser`` gives them (``TOOL_PARSERS``).

As Hermes': a call is well-formed when it names a declared function and its arguments are an
object (sent on as compact JSON text); text that is not such a call stays content, as written.
Llama's JSON calls and pythonic calls have no tag of their own: as vLLM's streams decide, they
are calls only when they open the output (after whitespace) and, here, only when they are the
whole output; one bad call leaves the whole output as content.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
import string
from collections.abc import Collection
from typing import Any

from vllm_runner.serving.tool_parsers import (
    HermesToolParser,
    LeadingToolParser,
    ParsedOutput,
    TaggedToolParser,
    ToolCall,
    ToolParser,
    make_call,
    not_json,
    with_content,
)

_JSON = json.JSONDecoder(parse_constant=not_json)
_SPACE = re.compile(r"\s*")
_ALPHANUMERIC = string.ascii_letters + string.digits


class Llama3JsonToolParser(LeadingToolParser):
    """Llama 3.1's and 3.2's JSON-based tool calling (vLLM's llama3_json, and llama4_json):
    the output is ``<|python_tag|>`` (a special token: there only if the request keeps them)
    or nothing, then calls ``{"name": ..., "parameters": {...}}`` (or ``"arguments"``:
    either, not both; none: no arguments) separated by ``;``."""

    openers = ("<|python_tag|>", "{")

    def parse(self, text: str, names: Collection[str]) -> ParsedOutput:
        body = text.lstrip().removeprefix(self.openers[0])
        calls: list[ToolCall | None] = []
        at = 0
        while True:
            try:  # (raw_decode reads one JSON value and says where it ends)
                call, at = _JSON.raw_decode(body, _SPACE.match(body, at).end())
            except (ValueError, RecursionError):  # (nesting deeper than Python's stack)
                return ParsedOutput(text, [])
            calls.append(_llama_call(call, names))
            at = _SPACE.match(body, at).end()
            if not body.startswith(";", at):
                break
            at += 1
        if at < len(body):  # (text after the calls)
            return ParsedOutput(text, [])
        return _all_calls(text, calls)


def _all_calls(text: str, calls: list[ToolCall | None]) -> ParsedOutput:
    """An output that is all calls: ``calls`` if each is one, else ``text`` as content."""
    good = [call for call in calls if call is not None]
    if not good or len(good) < len(calls):
        return ParsedOutput(text, [])
    return ParsedOutput(None, good)


def _llama_call(call: Any, names: Collection[str]) -> ToolCall | None:
    if not isinstance(call, dict) or {"arguments", "parameters"} <= call.keys():
        return None
    return make_call(call.get("name"), call.get("arguments", call.get("parameters", {})), names)


def _mistral_id() -> str:
    """A call id as Mistral's templates take them back (vLLM's for this format): nine
    letters and digits, the tool message's ``tool_call_id`` too."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


class MistralToolParser(TaggedToolParser):
    """Mistral's format (vLLM's mistral): any text, then ``[TOOL_CALLS]`` and a JSON list of
    calls ``[{"name": ..., "arguments": {...}}, ...]`` (Mistral 7B v0.3's tokenizer, before
    v11), or ``[TOOL_CALLS]`` before each call, ``name{...}`` (v11) or ``name[ARGS]{...}``
    (v13: Magistral, Devstral). A ``[TOOL_CALLS]`` whose calls are not all well-formed stays
    in the content with what follows it up to the next one, as a bad Hermes block does.
    """

    start = "[TOOL_CALLS]"
    keeps_special_tokens = True

    def parse(self, text: str, names: Collection[str]) -> ParsedOutput:
        first, *bodies = text.split(self.start)
        kept, calls = [first], []
        for body in bodies:
            found = _mistral_calls(body.strip(), names)
            if found:
                calls.extend(found)
            else:
                kept.append(self.start + body)
        return with_content(text, kept, calls)


def _listed_call(call: Any, names: Collection[str]) -> ToolCall | None:
    if not isinstance(call, dict):
        return None
    return make_call(call.get("name"), call.get("arguments", {}), names, _mistral_id)


def _mistral_calls(body: str, names: Collection[str]) -> list[ToolCall] | None:
    if body.startswith("["):  # the JSON list (before v11)
        try:
            listed = json.loads(body, parse_constant=not_json)
        except (ValueError, RecursionError):
            return None
        if not isinstance(listed, list):
            return None
        calls = [_listed_call(c, names) for c in listed]
        good = [call for call in calls if call is not None]
        return good if len(good) == len(calls) else None

    # NOTE: a function's name has no "{" (OpenAI's pattern), so its arguments open at the first
    opened = body.find("{")
    try:
        arguments = json.loads(body[opened:], parse_constant=not_json) if opened > 0 else None
    except (ValueError, RecursionError):
        return None
    call = make_call(body[:opened].removesuffix("[ARGS]"), arguments, names, _mistral_id)
    return None if call is None else [call]


class PythonicToolParser(LeadingToolParser):
    """Pythonic calls (vLLM's pythonic: Llama 3.2's and Llama 4's, ToolACE's): the output is
    a Python list of calls, ``[get_weather(city="Paris"), f(x=1)]``, their arguments keyword
    arguments whose values are literals: strings, numbers (a minus sign too), True / False /
    None, and lists, tuples and dicts (string keys) of them. Read with ``ast.parse``, never
    evaluated."""

    openers = ("[",)

    def parse(self, text: str, names: Collection[str]) -> ParsedOutput:
        source = text.strip()
        if not source.startswith(self.openers):  # (prose: not worth Python's parser)
            return ParsedOutput(text, [])
        try:
            listed = ast.parse(source, mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            # (MemoryError: CPython's parser on deep nesting; ValueError: a 5,000-digit int)
            return ParsedOutput(text, [])
        if not isinstance(listed, ast.List) or not _spans(listed, source):
            return ParsedOutput(text, [])
        return _all_calls(text, [_pythonic_call(node, names) for node in listed.elts])


def _spans(node: ast.expr, source: str) -> bool:
    """Whether ``node`` is all of ``source`` (not in parentheses, no comment after it)."""
    last = source.rsplit("\n", 1)[-1]
    start = (node.lineno, node.col_offset) == (1, 0)
    # NOTE: ast's column offsets count UTF-8 bytes
    return start and (node.end_lineno, node.end_col_offset) == (
        source.count("\n") + 1,
        len(last.encode()),
    )


class _NotLiteral(Exception):
    pass


def _pythonic_call(node: ast.expr, names: Collection[str]) -> ToolCall | None:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None  # (positional arguments have no names to send)
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None or keyword.arg in arguments:  # **kwargs; a name given twice
            return None
        try:
            arguments[keyword.arg] = _literal(keyword.value)
        except _NotLiteral:
            return None
    return make_call(node.func.id, arguments, names)


def _literal(node: ast.expr | None) -> Any:
    """A literal's value, as JSON has it (a tuple as a list); anything else raises."""
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):  # (a key None: **mapping)
        keys = [k.value if isinstance(k, ast.Constant) else None for k in node.keys]
        if not all(isinstance(k, str) for k in keys):
            raise _NotLiteral
        return {k: _literal(v) for k, v in zip(keys, node.values, strict=True)}
    negative = False
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node, negative = node.operand, True
    if not isinstance(node, ast.Constant):
        raise _NotLiteral  # (a name, an expression, a comprehension, ...)
    value = node.value
    if type(value) is int or (type(value) is float and math.isfinite(value)):
        return -value if negative else value  # (1e999 is inf: not JSON)
    if not negative and (value is None or type(value) in (str, bool)):
        return value
    raise _NotLiteral  # (bytes, a complex number, -"text", ...)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "llama4_json": Llama3JsonToolParser,  # (vLLM's name for the same parser)
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
}


def get_tool_parser(name: str | None) -> ToolParser | None:
    """The parser the server setting ``tool_call_parser`` names (None: off)."""
    if name is None:
        return None
    if name not in TOOL_PARSERS:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"tool_call_parser must be one of {known} (or unset: off), got {name!r}")
    return TOOL_PARSERS[name]()
