"""The tool-call formats beside Hermes' (``vllm_runner.serving.tool_formats``): outputs written
by hand in Llama 3's JSON form, Mistral's and the pythonic one, parsed whole and streamed (cut
at every character), exact content and calls; the names the setting takes."""

from __future__ import annotations

import re

import pytest

from vllm_runner.serving.tool_formats import (
    TOOL_PARSERS,
    Llama3JsonToolParser,
    MistralToolParser,
    PythonicToolParser,
    get_tool_parser,
)
from vllm_runner.serving.tool_parsers import HermesToolParser, ToolCallStream, ToolParser

NAMES = frozenset({"get_weather", "search"})
PARIS = ("get_weather", '{"city":"Paris"}')
RAIN = ("search", '{"q":"rain","limit":3}')
TOKYO = ("get_weather", '{"city":"東京 🌧"}')
LLAMA, MISTRAL, PYTHONIC = Llama3JsonToolParser(), MistralToolParser(), PythonicToolParser()

# output -> (content, [(name, arguments)])
CASES = {
    LLAMA: {
        '{"name": "get_weather", "parameters": {"city": "Paris"}}': (None, [PARIS]),
        '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris"}}': (None, [PARIS]),
        '\n {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "search", '
        '"parameters": {"q": "rain", "limit": 3}}\n': (None, [PARIS, RAIN]),
        '{"name":"search"}': (None, [("search", "{}")]),  # no arguments: an empty object
        '{"name": "get_weather", "parameters": {"city": "東京 🌧"}}': (None, [TOKYO]),
    },
    MISTRAL: {
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]': (None, [PARIS]),
        'Let me check.\n[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "search", "arguments": {"q": "rain", "limit": 3}}]': ("Let me check.\n",
                                                                        [PARIS, RAIN]),
        '[TOOL_CALLS]get_weather{"city": "Paris"}[TOOL_CALLS]search{"q": "rain", "limit": 3}': (
            None, [PARIS, RAIN]),
        'Zürich? [TOOL_CALLS]get_weather[ARGS]{"city": "東京 🌧"}': ("Zürich? ", [TOKYO]),
        "\n[TOOL_CALLS]search{}\n": (None, [("search", "{}")]),
        # a bad call beside a good one stays content, as written
        "[TOOL_CALLS]delete_all{}[TOOL_CALLS]search{}": ("[TOOL_CALLS]delete_all{}",
                                                         [("search", "{}")]),
        'Hm. [TOOL_CALLS]get_weather{"city": }\n[TOOL_CALLS]search{}': (
            'Hm. [TOOL_CALLS]get_weather{"city": }\n', [("search", "{}")]),
    },
    PYTHONIC: {
        '[get_weather(city="Paris")]': (None, [PARIS]),
        " [get_weather(city='Paris'), search(q=\"rain\", limit=3)]\n": (None, [PARIS, RAIN]),
        "[search()]": (None, [("search", "{}")]),
        '[get_weather(\n    city="東京 🌧",\n)]': (None, [TOKYO]),
        '[search(q="", limit=-2, ratio=-0.5, exact=True, page=None, tags=["a", ("b", 1)], '
        'filter={"range": [1, 2.5], "x": {"y": False}})]': (None, [("search",
            '{"q":"","limit":-2,"ratio":-0.5,"exact":true,"page":null,"tags":["a",["b",1]],'
            '"filter":{"range":[1,2.5],"x":{"y":false}}}')]),
    },
}  # fmt: skip
# outputs with no call: all content, as they are
NO_CALLS = {
    LLAMA: [
        "Paris is sunny today.",
        "",
        "  \n",
        "<|python",
        'I will call {"name": "get_weather", "parameters": {"city": "Paris"}}',  # not first
        '{"name": "get_weather", "parameters": {"city": "Paris"}} to know it',  # text after
        '{"name": "delete_all", "parameters": {}}',
        '{"name": "search"}; {"name": "delete_all", "parameters": {}}',  # one bad: none
        '{"name": "get_weather", "parameters": "city=Paris"}',
        '{"name": "get_weather", "parameters": {}, "arguments": {}}',  # which one?
        '{"name": "get_weather", "parameters": {"city": "Par',  # cut by max_tokens
        '{"name": "get_weather", "parameters": {"t": NaN}}',
        '{"name": "search"};',
        '{"name": "search"} {"name": "search"}',
        '["get_weather", {"city": "Paris"}]',
        '<|python_tag|>brave_search.call(query="Paris")',  # Llama's built-in tools: not JSON
        '{"a": 1} is JSON',
    ],
    MISTRAL: [
        "Paris is sunny today.",
        "",
        "a [TOOL_CA",
        '[TOOL_CALLS] [{"name": "delete_all", "arguments": {}}]',
        '[TOOL_CALLS] [{"name": "search"}, {"name": "delete_all"}]',  # one bad: the list stays
        "[TOOL_CALLS] []",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Par',
        '[TOOL_CALLS] [{"name": "search", "arguments": {"t": Infinity}}]',
        '[TOOL_CALLS] [["search", {}]]',
        '[TOOL_CALLS]get_weather{"city": "Paris"} and more',
        '[TOOL_CALLS]get_weather["Paris"]',
        "[TOOL_CALLS]get_weather",
        '[TOOL_CALLS]{"city": "Paris"}',
        '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}',  # (not read)
    ],
    PYTHONIC: [
        "Paris is sunny today.",
        "",
        " \n",
        "[link](https://example.com)",
        "[]",
        "[1, 2]",
        'Sure: [get_weather(city="Paris")]',  # not first
        '[get_weather(city="Paris")] is the call',  # text after
        '[get_weather(city="Paris")]  # a comment',
        '([get_weather(city="Paris")])',
        '[get_weather(city="Paris"), delete_all()]',  # one undeclared: none
        '[get_weather("Paris")]',  # positional: no name to send it by
        '[get_weather(city="Paris", city="Rome")]',
        '[get_weather(**{"city": "Paris"})]',
        "[get_weather(city=paris)]",
        '[get_weather(city="Par" + "is")]',
        '[get_weather(city=f"{x}")]',
        '[search(q=__import__("os").system("true"))]',
        '[os.system(command="true")]',
        '[search(q=b"rain")]',
        "[search(limit=1e999)]",
        "[search(limit=-True)]",
        '[search(limit=-"1")]',
        "[search(limit=1j)]",
        '[search(q={1: "a"})]',
        '[search(q={"a", "b"})]',
        '[search(q=[x for x in "ab"])]',
        "[search()][0]",
        '[get_weather(city="Par',  # cut by max_tokens
        f"[search(limit={'9' * 5000})]",  # (Python refuses to read it)
        "[search(q=" + "[" * 100_000 + "]" * 100_000 + ")]",  # (past the parser's nesting)
        "[search(q=" + "-" * 100_000 + "1)]",
        '[search(q="a")]\x00',
    ],
}
ALL = [(p, text) for p, cases in CASES.items() for text in cases]
ALL_CONTENT = [(p, text) for p, texts in NO_CALLS.items() for text in texts]


def _calls(parsed_calls) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in parsed_calls]


def _name(parser: ToolParser) -> str:
    return type(parser).__name__


@pytest.mark.parametrize(("parser", "text"), ALL, ids=[_name(p) for p, _ in ALL])
def test_calls_and_content(parser: ToolParser, text: str) -> None:
    parsed = parser.parse(text, NAMES)
    assert (parsed.content, _calls(parsed.tool_calls)) == CASES[parser][text]


@pytest.mark.parametrize(("parser", "text"), ALL_CONTENT, ids=[_name(p) for p, _ in ALL_CONTENT])
def test_text_without_good_calls_is_content(parser: ToolParser, text: str) -> None:
    parsed = parser.parse(text, NAMES)
    assert (parsed.content, parsed.tool_calls) == (text, [])


def _streamed(parser: ToolParser, pieces: list[str]) -> tuple[list[str], str, list]:
    """``pieces`` fed in turn: what each feed sent, and what finish gives."""
    stream = ToolCallStream(parser, NAMES)
    sent = [stream.feed(piece) for piece in pieces]
    rest, calls = stream.finish()
    return sent, rest, _calls(calls)


def _cuts(text: str) -> list[list[str]]:
    """``text`` a character a delta, and in two deltas at each character."""
    return [list(text), *([text[:i], text[i:]] for i in range(len(text) + 1))]


@pytest.mark.parametrize(("parser", "text"), ALL + ALL_CONTENT,
                         ids=[_name(p) for p, _ in ALL + ALL_CONTENT])  # fmt: skip
def test_a_stream_sends_what_the_whole_text_parses_to(parser: ToolParser, text: str) -> None:
    """However the text is cut, the content sent then the rest is the whole text's content
    and the calls are its calls; content stops before a call's marker (Mistral's tag) or,
    where calls are the whole output, none is sent before them."""
    if len(text) > 1000:
        text = text[:200]  # (the deep ones: their cuts are all alike)
    parsed = parser.parse(text, NAMES)
    content = parsed.content or ""
    before_tag = text.split(MistralToolParser.start)[0]
    for pieces in _cuts(text):
        sent, rest, calls = _streamed(parser, pieces)
        assert "".join(sent) + rest == content, pieces
        assert calls == _calls(parsed.tool_calls), pieces
        if parsed.tool_calls and parser is MISTRAL:
            assert "".join(sent) == (before_tag if before_tag.strip() else ""), pieces
        elif parsed.tool_calls:
            assert sent == [""] * len(pieces), pieces


def test_a_leading_format_sends_text_that_does_not_open_with_a_call() -> None:
    """An output's opening decides: text that cannot begin a call goes out as it comes;
    one that begins an opener waits (a call) or, past it, goes out; later "{" is text."""
    assert _streamed(LLAMA, ["Sun", "ny {", '"a"}']) == (["Sun", "ny {", '"a"}'], "", [])
    assert _streamed(LLAMA, ["Hi ", "{", '"a"}']) == (["Hi ", "{", '"a"}'], "", [])
    assert _streamed(LLAMA, ["\n ", "<|py", "thon", "ic"]) == (["", "", "", "\n <|python"
                                                              "ic"], "", [])  # fmt: skip
    assert _streamed(LLAMA, ["\n", "{", '"name": "search"}']) == (["", "", ""], "",
                                                                  [("search", "{}")])  # fmt: skip
    text = '{"a": 1} is JSON'
    assert _streamed(LLAMA, [text[:4], text[4:]]) == (["", ""], text, [])  # (given at the end)
    assert _streamed(PYTHONIC, ["[link]", "(x)"]) == (["", ""], "[link](x)", [])
    assert _streamed(PYTHONIC, ["a ", "[search()]"]) == (["a ", "[search()]"], "", [])


def test_mistral_streams_content_up_to_its_tag() -> None:
    text = 'Sure. [TOOL_CALLS]get_weather{"city": "Paris"}'
    pieces = ["Sure", ". [", "TOOL", "_CALLS]", "get_weather", '{"city": "Paris"}']
    assert _streamed(MISTRAL, pieces) == (["Sure", ". ", "", "", "", ""], "", [PARIS])
    assert _streamed(MISTRAL, [text]) == (["Sure. "], "", [PARIS])
    assert _streamed(MISTRAL, ["a [TO", "y"]) == (["a ", "[TOy"], "", [])


def test_call_ids() -> None:
    """Mistral's ids are nine letters and digits (its templates refuse others when a client
    sends the calls back, vLLM's note), the others vLLM's chatcmpl-tool-<hex>."""
    text = "[TOOL_CALLS]search{}[TOOL_CALLS]search{}"
    ids = [c.id for c in MISTRAL.parse(text, NAMES).tool_calls]
    assert len(ids) == 2 and ids[0] != ids[1]
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids), ids
    for parser, text in ((LLAMA, '{"name": "search"}'), (PYTHONIC, "[search()]")):
        (call,) = parser.parse(text, NAMES).tool_calls
        assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", call.id), call.id


def test_formats_by_the_names_vllm_gives_them() -> None:
    assert {name: type(get_tool_parser(name)) for name in TOOL_PARSERS} == {
        "hermes": HermesToolParser,
        "llama3_json": Llama3JsonToolParser,
        "llama4_json": Llama3JsonToolParser,
        "mistral": MistralToolParser,
        "pythonic": PythonicToolParser,
    }
    assert [p.keeps_special_tokens for p in (LLAMA, MISTRAL, PYTHONIC)] == [False, True, False]
