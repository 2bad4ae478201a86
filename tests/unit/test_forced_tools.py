"""A forced tool_choice's schema and how its output is read back (serving/forced_tools.py):
"required" needs one declared call or more; a list cut short is no call; a named call's
arguments are its text as generated."""

import json
from types import SimpleNamespace

from vllm_runner import SamplingParams
from vllm_runner.sample.regex_dfa import compiled
from vllm_runner.serving.forced_tools import forced_calls, forced_schema

TIME = {"type": "object", "required": ["zone"], "properties": {"zone": {"enum": ["UTC"]}}}
TOOLS = [SimpleNamespace(function=SimpleNamespace(name="get_time", parameters=TIME)),
         SimpleNamespace(function=SimpleNamespace(name="ping", parameters=None))]  # fmt: skip
NAMED = {"type": "function", "function": {"name": "get_time"}}
CALL = '[{"name": "get_time", "parameters": {"zone": "UTC"}}, {"name": "ping", "parameters": {}}]'


def test_required_takes_one_declared_call_or_more() -> None:
    dfa = compiled(SamplingParams(guided_json=forced_schema("required", TOOLS)).guided_pattern)
    assert dfa.fullmatch(CALL)
    assert not dfa.fullmatch("[]")  # (minItems 1: a call is required)
    assert not dfa.fullmatch('[{"name": "other", "parameters": {}}]')
    assert not dfa.fullmatch('[{"name": "ping"}]')  # (read back as call["parameters"])
    assert not dfa.fullmatch('[{"name": "get_time", "parameters": {"zone": "CET"}}]')
    assert forced_schema(NAMED, TOOLS) == TIME


def test_the_calls_are_read_back_as_json_text() -> None:
    calls = forced_calls(CALL, "required")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_time", {"zone": "UTC"}),
        ("ping", {}),
    ]
    [call] = forced_calls('[{"name": "ping", "parameters": {"city": "Zürich"}}]', "required")
    assert call.arguments == '{"city": "Zürich"}'  # (as vLLM's: not ASCII-escaped)
    assert forced_calls(CALL[:30], "required") == []  # (cut by max_tokens or a stop string)
    [named] = forced_calls('{"zone": "U', NAMED)  # (as vLLM's: the text as generated)
    assert (named.name, named.arguments) == ("get_time", '{"zone": "U')
