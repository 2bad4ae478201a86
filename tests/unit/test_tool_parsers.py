"""Tool-call parsing (``vllm_runner.serving.tool_parsers``): Hermes-format outputs written by
hand, whole and streamed in pieces (a tag split across deltas), exact content and calls."""

from __future__ import annotations

import re

import pytest

from vllm_runner.serving.settings import ServerSettings
from vllm_runner.serving.tool_formats import get_tool_parser
from vllm_runner.serving.tool_parsers import HermesToolParser, ToolCallStream, parser_for

NAMES = frozenset({"get_weather", "search"})
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SEARCH = '<tool_call>\n{"name": "search", "arguments": {"q": "rain", "limit": 3}}\n</tool_call>'
BAD_JSON = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
UNDECLARED = '<tool_call>\n{"name": "delete_all", "arguments": {}}\n</tool_call>'
NESTED = (
    '<tool_call>\n{"name": "search", "arguments": {"filter": {"range": [1, 2.5], '
    '"tags": ["a", {"b": null}]}, "exact": true, "q": ""}}\n</tool_call>'
)

# output -> (content, [(name, arguments)])
CASES = {
    WEATHER: (None, [("get_weather", '{"city":"Paris"}')]),
    f"Let me check.\n{WEATHER}\n{SEARCH}": (
        "Let me check.\n",
        [("get_weather", '{"city":"Paris"}'), ("search", '{"q":"rain","limit":3}')],
    ),
    f"\n\n{WEATHER}\n": (None, [("get_weather", '{"city":"Paris"}')]),
    f"{WEATHER}\nI asked for the weather.": (
        "\nI asked for the weather.",
        [("get_weather", '{"city":"Paris"}')],
    ),
    NESTED: (
        None,
        [("search", '{"filter":{"range":[1,2.5],"tags":["a",{"b":null}]},"exact":true,"q":""}')],
    ),
    # unicode stays as it is (no \u escapes)
    'Zürich? <tool_call>{"name": "get_weather", "arguments": {"city": "東京 🌧"}}</tool_call>': (
        "Zürich? ",
        [("get_weather", '{"city":"東京 🌧"}')],
    ),
    # no arguments: an empty object; the last block unclosed (a stop string, EOS) but whole
    '<tool_call>{"name": "search"}</tool_call><tool_call>{"name": "get_weather", '
    '"arguments": {"city": "Rome"}}': (
        None,
        [("search", "{}"), ("get_weather", '{"city":"Rome"}')],
    ),
    # a bad block beside a good one stays content
    f"{BAD_JSON}\n{SEARCH}": (BAD_JSON, [("search", '{"q":"rain","limit":3}')]),
    f"Hm. {UNDECLARED}{WEATHER}": (f"Hm. {UNDECLARED}", [("get_weather", '{"city":"Paris"}')]),
}
# outputs with no call: all content, as they are
NO_CALLS = [
    "Paris is sunny today.",
    "",
    "  \n",
    BAD_JSON,
    f"Sure: {UNDECLARED}",
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Par',  # cut by max_tokens
    '<tool_call>{"name": "get_weather", "arguments": "city=Paris"}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"t": NaN}}</tool_call>',
    '<tool_call>["get_weather", {"city": "Paris"}]</tool_call>',
    '<tool_call>{"name": ["get_weather"]}</tool_call>',
    "a <tool_c",
    "</tool_call> and <tool",
]


def _calls(parsed_calls) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in parsed_calls]


@pytest.mark.parametrize("text", CASES)
def test_hermes_calls_and_content(text: str) -> None:
    parsed = HermesToolParser().parse(text, NAMES)
    assert (parsed.content, _calls(parsed.tool_calls)) == CASES[text]


@pytest.mark.parametrize("text", NO_CALLS)
def test_hermes_text_without_a_good_call_is_content(text: str) -> None:
    parsed = HermesToolParser().parse(text, NAMES)
    assert (parsed.content, parsed.tool_calls) == (text, [])


def test_nesting_deeper_than_pythons_stack_is_no_call() -> None:
    deep = '<tool_call>{"name": "search", "arguments": {"q": ' + "[" * 100_000 + "}}</tool_call>"
    assert HermesToolParser().parse(deep, NAMES).tool_calls == []


def test_calls_in_openai_shape_with_their_own_ids() -> None:
    parsed = HermesToolParser().parse(f"{WEATHER}{WEATHER}", NAMES)
    first, second = (c.as_dict() for c in parsed.tool_calls)
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", first["id"]) and first["id"] != second["id"]
    function = {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert first == {"id": first["id"], "type": "function", "function": function}
    assert parsed.tool_calls[1].delta(1) == {"index": 1, **second}


def _streamed(text: str, pieces: list[int]) -> tuple[list[str], str, list[tuple[str, str]]]:
    """``text`` fed in pieces of the given lengths (the rest in one): what each feed sent,
    and what finish gives."""
    stream = ToolCallStream(HermesToolParser(), NAMES)
    sent, at = [], 0
    for n in [*pieces, len(text)]:
        sent.append(stream.feed(text[at : at + n]))
        at += n
    rest, calls = stream.finish()
    return sent, rest, _calls(calls)


@pytest.mark.parametrize("text", [*CASES, *NO_CALLS])
@pytest.mark.parametrize("size", [1, 3, 7])
def test_a_stream_sends_what_the_whole_text_parses_to(text: str, size: int) -> None:
    """Fed in pieces of any size, the content sent then the rest is the whole text's
    content, and the calls are its calls; no piece of a tag is sent as content."""
    sent, rest, calls = _streamed(text, [size] * (len(text) // size))
    parsed = HermesToolParser().parse(text, NAMES)
    assert "".join(sent) + rest == (parsed.content or "")
    assert calls == _calls(parsed.tool_calls)
    if parsed.tool_calls:
        assert not any("<tool" in s or s.endswith("<") for s in sent), sent


def test_a_tag_split_across_deltas_is_held_back() -> None:
    text = f"Sure. {WEATHER}"
    sent, rest, calls = _streamed(text, [4, 3, 1, 4, 3, 5])  # "Sure", ". <", "t", "ool_", ...
    assert sent[:5] == ["Sure", ". ", "", "", ""]
    assert "".join(sent) == "Sure. " and rest == ""
    assert calls == [("get_weather", '{"city":"Paris"}')]


def test_a_held_piece_that_is_no_tag_is_sent_on() -> None:
    sent, rest, calls = _streamed("a <b> <tool_", [3, 2])
    assert sent == ["a ", "<b>", " "] and rest == "<tool_" and calls == []


def test_whitespace_waits_for_text() -> None:
    assert _streamed(f"\n \n{WEATHER}", [1, 1, 1]) == (["", "", "", ""], "", [("get_weather",
        '{"city":"Paris"}')])  # fmt: skip
    assert _streamed("\n\nHi", [1, 1]) == (["", "", "\n\nHi"], "", [])


def test_a_bad_block_comes_as_content_at_the_end() -> None:
    sent, rest, calls = _streamed(f"Hi {BAD_JSON}", [3])
    assert (sent, rest, calls) == (["Hi ", ""], BAD_JSON, [])


def test_parsers_are_named_by_the_setting() -> None:
    assert get_tool_parser(None) is None
    assert isinstance(get_tool_parser("hermes"), HermesToolParser)
    known = "hermes, llama3_json, llama4_json, mistral, pythonic"
    with pytest.raises(ValueError, match=rf"^tool_call_parser must be one of {known} \(or unset: "
                       r"off\), got 'granite'$"):  # fmt: skip
        get_tool_parser("granite")
    settings = ServerSettings.load({"VLLM_RUNNER_TOOL_CALL_PARSER": "hermes"}, {})
    assert settings.tool_call_parser == "hermes"
    assert "tool_call_parser" not in settings.engine_kwargs()  # (a server setting only)
    assert ServerSettings.load({"VLLM_RUNNER_TOOL_CALL_PARSER": ""}, {}).tool_call_parser is None
    with pytest.raises(ValueError, match=r"got 'Hermes'$"):
        ServerSettings.load({}, {"tool_call_parser": "Hermes"})


def test_auto_tool_choice_needs_a_parser() -> None:
    hermes = HermesToolParser()
    assert parser_for(hermes, True, "auto", False) is hermes
    assert parser_for(hermes, True, None, False) is hermes  # OpenAI's default with tools
    assert parser_for(hermes, True, "none", False) is None
    assert parser_for(hermes, False, "auto", False) is None
    assert parser_for(None, True, "none", True) is None
    with pytest.raises(ValueError, match=r'^tool_choice: "auto" needs the server setting '
                       r"tool_call_parser .*, got left out \(auto, with tools\)$"):  # fmt: skip
        parser_for(None, True, None, False)
    with pytest.raises(ValueError, match=r"^use_beam_search: beams are not parsed for tool "
                       r"calls; .*, got tool_choice 'auto'$"):  # fmt: skip
        parser_for(hermes, True, "auto", True)
