"""Reasoning in a thinking model's output, as vLLM's reasoning parsers split it: the text inside
``<think>...</think>`` becomes a chat message's ``reasoning_content``, the rest its ``content``.

The server setting ``reasoning_parser`` names the format (a key of ``REASONING_PARSERS``). Both
formats read the first ``<think>`` and the first ``</think>`` after it; later tags are text.

- ``deepseek_r1`` (DeepSeek-R1 and its distills, QwQ, Qwen3's thinking-only releases): the
  chat template already opened the reasoning in the prompt, so the output starts in it (a
  ``<think>`` the model writes itself is dropped, text before it is reasoning too) and runs to
  ``</think>``; an output without ``</think>`` (cut by max_tokens, say) is all reasoning.
- ``qwen3`` (Qwen3's hybrid models): reasoning only from a ``<think>`` the model writes; an
  output without one (``chat_template_kwargs: {"enable_thinking": false}``) is content, as
  without a parser. Text before ``<think>`` is content (whitespace alone there only lays the
  tag out: dropped); a ``<think>`` never closed (a length stop) makes the rest reasoning.

Once a tag is read, reasoning or content that is empty or whitespace alone is null.
``ReasoningStream`` gives a stream's deltas the same split: a piece of a tag at a delta's end
is held back until the next delta shows whether it is one, so no tag is ever sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_runner.serving.tool_parsers import tag_start_at_end

START, END = "<think>", "</think>"
_BEFORE, _REASONING, _CONTENT = "before", "reasoning", "content"  # ReasoningStream.state


@dataclass(frozen=True)
class Reasoned:
    """Text split in two: a stream's delta ("": none), or a whole output (None: none)."""

    reasoning: str | None
    content: str | None


@dataclass(frozen=True)
class ReasoningParser:
    """One model family's reasoning format."""

    name: str
    opened_in_prompt: bool  # the template ends the prompt inside the reasoning (DeepSeek-R1)

    def split(self, text: str) -> Reasoned:
        """A whole output's reasoning and content, as its stream would send them."""
        stream = ReasoningStream(self)
        sent, rest = stream.feed(text), stream.finish()
        reasoning, content = sent.reasoning + rest.reasoning, sent.content + rest.content
        if stream.state == _BEFORE and not self.opened_in_prompt:
            return Reasoned(None, text)  # no tag read: the output as it is ("" included)
        return Reasoned(reasoning or None, content or None)


REASONING_PARSERS = {
    "deepseek_r1": ReasoningParser("deepseek_r1", opened_in_prompt=True),
    "qwen3": ReasoningParser("qwen3", opened_in_prompt=False),
}


def get_reasoning_parser(name: str | None) -> ReasoningParser | None:
    """The parser the server setting ``reasoning_parser`` names (None: off)."""
    if name is None:
        return None
    if name not in REASONING_PARSERS:
        known = ", ".join(sorted(REASONING_PARSERS))
        raise ValueError(f"reasoning_parser must be one of {known} (or unset: off), got {name!r}")
    return REASONING_PARSERS[name]


def guided(params: Any) -> bool:
    """Whether a request's output is guided (guided_*, JSON mode, a forced tool call). The
    guide holds it from its first token, so the model writes no reasoning of its own: the
    parser leaves such an output alone, all content (vLLM guides only after the reasoning)."""
    masked = params.guided_pattern is not None or bool(params.guided_grammar)
    return bool(params.guided_choice) or masked or params.json_object


class ReasoningStream:
    """One streamed choice's text under a parser: ``feed`` each delta and send what it
    returns; at the end, ``finish`` gives what was held back."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.state = _BEFORE  # no tag read yet / inside the reasoning / after it
        # held: whitespace waiting for text (a part with nothing else sent yet), then a piece
        # of a tag at the end. NOTE: no tag is in what was sent, so only this is searched.
        self.unsent = ""
        self.begun = {_REASONING: False, _CONTENT: False}  # a part sent more than whitespace

    def _part(self) -> str:
        """Where the text now goes."""
        if self.state == _BEFORE:
            return _REASONING if self.parser.opened_in_prompt else _CONTENT
        return self.state

    def _tags(self) -> tuple[str, ...]:
        """The tags read in this state (only the first of each counts)."""
        if self.state == _BEFORE:
            return (START, END) if self.parser.opened_in_prompt else (START,)
        return (END,) if self.state == _REASONING else ()

    def feed(self, delta: str) -> Reasoned:
        sent = {_REASONING: "", _CONTENT: ""}
        text = self.unsent + delta
        while found := min(((text.find(t), t) for t in self._tags() if t in text), default=None):
            at, tag = found
            part, before = self._part(), text[:at]
            if self.begun[part] or before.strip():  # (whitespace alone before a tag: dropped)
                sent[part] += before
                self.begun[part] = True
            self.state = _REASONING if tag == START else _CONTENT
            text = text[at + len(tag) :]
        part = self._part()
        held = max((tag_start_at_end(text, t) for t in self._tags()), default=0)
        ready = text[: len(text) - held]
        if self.begun[part] or ready.strip():
            sent[part] += ready
            self.begun[part] = True
            text = text[len(ready) :]
        self.unsent = text
        return Reasoned(sent[_REASONING], sent[_CONTENT])

    def finish(self) -> Reasoned:
        """What was held back: a piece of a tag that the output ended in is text; whitespace
        alone is dropped, unless no tag was read and the output is content as it is."""
        part, text = self._part(), self.unsent
        self.unsent = ""
        untouched = self.state == _BEFORE and part == _CONTENT
        if not (self.begun[part] or text.strip() or untouched):
            text = ""
        return Reasoned(text if part == _REASONING else "", text if part == _CONTENT else "")
