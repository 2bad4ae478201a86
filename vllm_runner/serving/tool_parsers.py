"""Tool calls in a model's output, as vLLM's tool-call parsers find them: the calls a model
wrote in its chat template's format become OpenAI's ``tool_calls``.

The server setting ``tool_call_parser`` names the format (a key of ``tool_formats.TOOL_PARSERS``,
where the formats other than Hermes' are). The chat route parses each choice's text once it is
generated; a stream passes its text on as content until a call opens (``ToolCallStream``), and
sends the calls when the choice ends.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar


def _tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's form


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # the arguments object as compact JSON text
    id: str = field(default_factory=_tool_call_id)

    def as_dict(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}

    def delta(self, index: int) -> dict[str, Any]:
        """The call as a stream's ``delta.tool_calls`` entry: whole, at its ``index``."""
        return {"index": index, **self.as_dict()}


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # the text that is not a call (None: only whitespace)
    tool_calls: list[ToolCall]


class ToolParser(ABC):
    """One model family's tool-call format."""

    # NOTE: True where a call opens with a special token (Mistral's [TOOL_CALLS]): the
    # output's text then keeps special tokens, as vLLM's parser asks (adjust_request)
    keeps_special_tokens: ClassVar[bool] = False

    @abstractmethod
    def parse(self, text: str, names: Collection[str]) -> ParsedOutput:
        """``text``'s calls of the functions ``names``. Text with no well-formed call is
        content as it is (the model's output is what it is: not an error)."""

    @abstractmethod
    def sendable(self, unsent: str, at_start: bool) -> tuple[int, bool]:
        """For a stream: how many characters that begin ``unsent`` (the text after the
        content sent) may be sent as content, and whether a call opens after them (then
        nothing more is sent until the end). ``at_start``: no content was sent yet."""


class TaggedToolParser(ToolParser):
    """A format whose calls open with a fixed tag, anywhere in the output."""

    start: ClassVar[str]

    def sendable(self, unsent: str, at_start: bool) -> tuple[int, bool]:
        opened = unsent.find(self.start)
        if opened != -1:
            return opened, True
        # a piece of the tag that ends the text waits (the tag may come in several tokens)
        return len(unsent) - tag_start_at_end(unsent, self.start), False


class LeadingToolParser(ToolParser):
    """A format whose calls are the whole output, opening it (after whitespace) with one of
    ``openers``, as vLLM's streams decide: an output that opens with other text is content."""

    openers: ClassVar[tuple[str, ...]]

    def sendable(self, unsent: str, at_start: bool) -> tuple[int, bool]:
        if not at_start:  # (content went out: the output does not open with a call)
            return len(unsent), False
        text = unsent.lstrip()
        if text.startswith(self.openers):
            return 0, True
        if any(opener.startswith(text) for opener in self.openers):  # (or whitespace alone)
            return 0, False
        return len(unsent), False


class HermesToolParser(TaggedToolParser):
    """Hermes' format, also Qwen2.5's and Qwen3's: any text, then calls of the form
    ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.

    A block whose JSON is bad, that names no declared function or whose arguments are not an
    object stays in the content, as the text around the calls does (only the whitespace
    that lays the calls out is dropped). A last block the output ends in before its closing
    tag (a stop string, EOS) is a call if its JSON is whole.
    """

    start = "<tool_call>"
    end = "</tool_call>"

    def parse(self, text: str, names: Collection[str]) -> ParsedOutput:
        kept: list[str] = []  # text outside the calls, bad blocks included
        calls: list[ToolCall] = []
        at = 0
        while (opened := text.find(self.start, at)) != -1:
            closed = text.find(self.end, opened)
            stop = len(text) if closed == -1 else closed + len(self.end)
            body = text[opened + len(self.start) : len(text) if closed == -1 else closed]
            kept.append(text[at:opened])
            call = _call(body, names)
            if call is None:
                kept.append(text[opened:stop])
            else:
                calls.append(call)
            at = stop
        kept.append(text[at:])
        return with_content(text, kept, calls)


def with_content(text: str, kept: list[str], calls: list[ToolCall]) -> ParsedOutput:
    """``text`` parsed to ``calls`` and the ``kept`` pieces around them, less those of
    whitespace alone (they lay the calls out); no calls: ``text`` is all content."""
    if not calls:
        return ParsedOutput(text, [])
    content = "".join(piece for piece in kept if piece.strip())
    return ParsedOutput(content or None, calls)


def not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")  # (Python's json reads NaN and Infinity)


def make_call(
    name: Any, arguments: Any, names: Collection[str], new_id: Callable[[], str] = _tool_call_id
) -> ToolCall | None:
    """A call of one of the functions ``names`` with an arguments object (None: not one)."""
    if not isinstance(name, str) or name not in names or not isinstance(arguments, dict):
        return None
    compact = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    return ToolCall(name, compact, new_id())


def _call(body: str, names: Collection[str]) -> ToolCall | None:
    try:
        call = json.loads(body, parse_constant=not_json)
    except (ValueError, RecursionError):  # (nesting deeper than Python's stack)
        return None
    if not isinstance(call, dict):
        return None
    return make_call(call.get("name"), call.get("arguments", {}), names)


def parser_for(
    parser: ToolParser | None, tools: bool, tool_choice: str | None, beam_search: bool
) -> ToolParser | None:
    """What parses a chat request's output: the server's ``parser`` when the request lets
    the model call its ``tools`` ("auto", OpenAI's default with tools); none for "none" (the
    template still gets the tools) or without tools. "auto" on a server without a parser is
    refused, as vLLM's without --enable-auto-tool-choice."""
    if not tools or tool_choice == "none":
        return None
    chosen = "'auto'" if tool_choice else "left out (auto, with tools)"
    if parser is None:
        raise ValueError(
            'tool_choice: "auto" needs the server setting tool_call_parser '
            '(VLLM_RUNNER_TOOL_CALL_PARSER, e.g. hermes), which is off; send "none" to give '
            f"the template the tools without parsing calls, got {chosen}"
        )
    if beam_search:
        raise ValueError(
            'use_beam_search: beams are not parsed for tool calls; send tool_choice "none" '
            f"with it, got tool_choice {chosen}"
        )
    return parser


def chat_message(
    text: str | None, parser: ToolParser | None, names: Collection[str]
) -> dict[str, Any]:
    """A whole choice's ``message``: its calls, if ``parser`` finds any, and the content
    (``text`` None: none, e.g. an output that was all reasoning)."""
    if text is None or parser is None:
        return {"role": "assistant", "content": text}
    parsed = parser.parse(text, names)
    if not parsed.tool_calls:
        return {"role": "assistant", "content": text}
    calls = [call.as_dict() for call in parsed.tool_calls]
    return {"role": "assistant", "content": parsed.content, "tool_calls": calls}


class ToolCallStream:
    """One streamed choice's text under a parser: ``feed`` each delta and send on what it
    returns as content; at the end, ``finish`` gives the rest of the content and the calls.

    Content stops where the parser says a call may open (``ToolParser.sendable``: before a
    tag, also a piece of it that ends a delta; an output's opening); whitespace alone waits
    for text (before a call, it is dropped). So what was sent always begins the content the
    whole text parses to.
    """

    def __init__(self, parser: ToolParser, names: Collection[str]) -> None:
        self.parser, self.names = parser, names
        self.parts: list[str] = []  # every delta (joined once, at the end)
        # what follows the content sent: whitespace waiting for text, a piece of a tag
        # NOTE: no call opens in what was sent, so only this is searched for one
        self.unsent = ""
        self.sent = 0  # characters sent as content
        self.held = False  # a call opened: nothing more is sent until the end

    def feed(self, delta: str) -> str:
        self.parts.append(delta)
        if self.held:
            return ""
        unsent = self.unsent + delta
        ready, self.held = self.parser.sendable(unsent, self.sent == 0)
        if self.sent == 0 and not unsent[:ready].strip():
            self.unsent = unsent
            return ""
        out, self.unsent = unsent[:ready], unsent[ready:]
        self.sent += ready
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content not sent yet, and the calls (none: the text was all content)."""
        parsed = self.parser.parse("".join(self.parts), self.names)
        return (parsed.content or "")[self.sent :], parsed.tool_calls


def tag_start_at_end(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag`` (0: none)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
