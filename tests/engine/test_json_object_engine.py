"""json_object end to end on the default model (CPU), with synchronous steps and with async
scheduling (which a JSON request turns off while it runs): greedy and sampled outputs are
one JSON object then an EOS; an output cut by max_tokens is a prefix of one."""

import json

import pytest

from vllm_runner import LLM, SamplingParams
from vllm_runner.sample.json_grammar import is_json_object, is_json_prefix

ASK = "Describe a cat as a JSON object with the keys name, age and colors."


def _prompt(llm: LLM) -> str:
    messages = [{"role": "user", "content": ASK}]
    return llm.get_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def _assert_one_object_then_eos(llm: LLM, out) -> None:
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.eos_ids, out
    assert isinstance(json.loads(out.text), dict) and is_json_object(out.text.encode())


@pytest.mark.parametrize("steps", ["sync", "async"])
def test_greedy_output_is_one_object_then_eos(smol_engines, steps) -> None:
    llm = smol_engines[steps]
    params = SamplingParams(temperature=0.0, max_tokens=200, json_object=True)
    out = llm.generate([_prompt(llm)], params)[0].outputs[0]
    _assert_one_object_then_eos(llm, out)
    if steps == "async":  # the same tokens as synchronous steps
        want = smol_engines["sync"].generate([_prompt(llm)], params)[0].outputs[0]
        assert out.token_ids == want.token_ids


@pytest.mark.parametrize("steps", ["sync", "async"])
def test_sampled_outputs_are_objects_then_eos(smol_engines, steps) -> None:
    llm = smol_engines[steps]
    params = SamplingParams(temperature=1.0, n=3, seed=0, max_tokens=200, json_object=True)
    outs = llm.generate([_prompt(llm)], params)[0].outputs
    for out in outs:
        _assert_one_object_then_eos(llm, out)
    assert len({o.text for o in outs}) == 3
    assert llm.engine.num_host_bound == 0  # (steps overlap again once the request is done)


def test_an_object_cut_by_max_tokens_is_a_prefix(smol_engines) -> None:
    llm = smol_engines["sync"]
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=9, json_object=True)
    out = llm.generate([_prompt(llm)], params)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 9
    assert is_json_prefix(out.text.encode()) and out.text.lstrip().startswith("{")
