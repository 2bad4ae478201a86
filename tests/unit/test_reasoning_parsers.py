"""Reasoning parsing (``vllm_runner.serving.reasoning_parsers``): outputs written by hand,
whole and streamed in every chunking into up to four pieces and one character a piece (so each
tag is cut at every place, once or twice), exact reasoning and content, no tag ever sent."""

from __future__ import annotations

import itertools

import pytest

from vllm_runner.sampling_params import SamplingParams
from vllm_runner.serving.reasoning_parsers import (
    REASONING_PARSERS,
    Reasoned,
    ReasoningStream,
    get_reasoning_parser,
    guided,
)
from vllm_runner.serving.settings import ServerSettings

# output -> (reasoning_content, content) of the whole text
QWEN3 = {
    "<think>\nLet me see.\n</think>\n\nParis.": ("\nLet me see.\n", "\n\nParis."),
    "Paris.": (None, "Paris."),  # (enable_thinking false: no tags, as without a parser)
    "": (None, ""),
    " \n": (None, " \n"),  # (no tag: as it is, whitespace too)
    "<think></think>Paris.": (None, "Paris."),  # empty reasoning: null
    "<think> \n</think>\n\nParis.": (None, "\n\nParis."),  # whitespace alone: null
    "<think>Hm.</think>": ("Hm.", None),
    "<think>Hm.</think>\n\n": ("Hm.", None),
    "<think>Hm, cut": ("Hm, cut", None),  # a length stop inside the reasoning
    "<think>Hm.</thi": ("Hm.</thi", None),  # ... inside the closing tag: text
    "\n<think>Hm.</think>Paris.": ("Hm.", "Paris."),  # whitespace laying the tag out: dropped
    "Sure. <think>Hm.</think>Paris.": ("Hm.", "Sure. Paris."),  # text before it: content
    "Hm.</think>Paris.": (None, "Hm.</think>Paris."),  # no <think>: no reasoning
    "<think>a<think>b</think>c</think>d": ("a<think>b", "c</think>d"),  # first pair only
    "1 < 2 <thinking": (None, "1 < 2 <thinking"),
    "<thi": (None, "<thi"),  # a piece of a tag the output ended in: text
}
DEEPSEEK_R1 = {
    "Let me see.\n</think>\n\nParis.": ("Let me see.\n", "\n\nParis."),
    "<think>\nHm.</think>Paris.": ("\nHm.", "Paris."),  # a <think> of its own: dropped
    "Hm, cut": ("Hm, cut", None),  # no </think>: all reasoning
    "": (None, None),
    " \n": (None, None),
    "</think>Paris.": (None, "Paris."),
    "\n\n</think>\n\nParis.": (None, "\n\nParis."),
    " <think>Hm.</think>Paris.": ("Hm.", "Paris."),
    "So<think>Hm.</think>Paris.": ("SoHm.", "Paris."),  # text before <think>: reasoning
    "Hm.</think>Paris.</think>!": ("Hm.", "Paris.</think>!"),  # later tags: text
    "Hm.</think>Paris.<think>!": ("Hm.", "Paris.<think>!"),
    "Hm.</think>\n": ("Hm.", None),
    "a < b </thinking": ("a < b </thinking", None),
    "Hm </": ("Hm </", None),
}
ALL = [("qwen3", QWEN3), ("deepseek_r1", DEEPSEEK_R1)]
CASES = [(name, text, *want) for name, cases in ALL for text, want in cases.items()]


def chunkings(text: str) -> list[list[str]]:
    """``text`` in every way of up to four pieces, and one character a piece."""
    ways = [[text], list(text)]
    for k in (1, 2, 3):
        for cuts in itertools.combinations(range(1, len(text)), k):
            bounds = [0, *cuts, len(text)]
            ways.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return ways


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), CASES)
def test_a_whole_output(name: str, text: str, reasoning: str | None, content: str | None) -> None:
    assert REASONING_PARSERS[name].split(text) == Reasoned(reasoning, content)


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), CASES)
def test_every_chunking_streams_the_same_split(
    name: str, text: str, reasoning: str | None, content: str | None
) -> None:
    """Joined, the deltas are the whole output's split (null: nothing sent), however the
    text is cut: no piece of a tag, no whitespace of a null part, is ever sent."""
    for pieces in chunkings(text):
        stream = ReasoningStream(REASONING_PARSERS[name])
        deltas = [stream.feed(p) for p in pieces] + [stream.finish()]
        sent = ("".join(d.reasoning for d in deltas), "".join(d.content for d in deltas))
        assert sent == (reasoning or "", content or ""), pieces


def test_text_goes_out_as_soon_as_no_tag_can_begin_in_it() -> None:
    """Held back: a piece of a tag at a delta's end, whitespace before any text of its part."""
    stream = ReasoningStream(REASONING_PARSERS["qwen3"])
    sent = [
        stream.feed(p) for p in ["\n", "<th", "ink>", " Hm", ". <", "/think", ">\n", "Ok <", "3"]
    ]
    assert sent == [
        Reasoned("", ""),  # whitespace: waits for text (dropped: it lays <think> out)
        Reasoned("", ""),
        Reasoned("", ""),
        Reasoned(" Hm", ""),
        Reasoned(". ", ""),
        Reasoned("", ""),
        Reasoned("", ""),  # the content's first whitespace waits for text too
        Reasoned("", "\nOk <"),  # (after </think> no tag is read: "<" goes out)
        Reasoned("", "3"),
    ]
    assert stream.finish() == Reasoned("", "")


def test_parsers_are_named_by_the_setting() -> None:
    assert get_reasoning_parser(None) is None
    assert get_reasoning_parser("qwen3") is REASONING_PARSERS["qwen3"]
    assert get_reasoning_parser("deepseek_r1").opened_in_prompt
    with pytest.raises(ValueError, match=r"^reasoning_parser must be one of deepseek_r1, qwen3 "
                       r"\(or unset: off\), got 'granite'$"):  # fmt: skip
        get_reasoning_parser("granite")
    settings = ServerSettings.load({"VLLM_RUNNER_REASONING_PARSER": "deepseek_r1"}, {})
    assert settings.reasoning_parser == "deepseek_r1"
    assert "reasoning_parser" not in settings.engine_kwargs()  # (a server setting only)
    assert ServerSettings.load({"VLLM_RUNNER_REASONING_PARSER": ""}, {}).reasoning_parser is None
    assert ServerSettings.load({}, {"reasoning_parser": "qwen3"}).reasoning_parser == "qwen3"
    with pytest.raises(ValueError, match=r"got 'Qwen3'$"):
        ServerSettings.load({}, {"reasoning_parser": "Qwen3"})


def test_guided_outputs_are_known() -> None:
    """Guided outputs (a forced tool call is guided_json) are left alone by the route."""
    assert not guided(SamplingParams())
    for fields in ({"guided_choice": ["yes", "no"]}, {"guided_regex": "a+"},
                   {"guided_json": {"type": "object"}}, {"json_object": True},
                   {"guided_grammar": 'root ::= "a"'}):  # fmt: skip
        assert guided(SamplingParams(**fields)), fields
