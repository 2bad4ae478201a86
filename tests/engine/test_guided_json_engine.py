"""guided_json end to end on the default model (CPU), synchronous steps and async scheduling:
every output is one document the schema allows (parsed, and checked against the schema's
rules here), then an EOS; greedy output equals guided_regex's with the schema's regex (one
mask path)."""

import json

import pytest

from vllm_runner import SamplingParams
from vllm_runner.sample.json_schema import schema_to_regex

PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "species": {"enum": ["cat", "dog", "parrot"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 40},
        "vaccinated": {"type": "boolean"},
        "toys": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "species", "age"],
}
ASK = "Describe a pet as a JSON object with its name, species, age and toys."


def _valid(doc: dict) -> bool:
    props = PET["properties"]
    return (
        set(doc) <= set(props)
        and {"name", "species", "age"} <= set(doc)
        and isinstance(doc["name"], str) and 1 <= len(doc["name"]) <= 16
        and doc["species"] in props["species"]["enum"]
        and type(doc["age"]) is int and 0 <= doc["age"] <= 40
        and type(doc.get("vaccinated", True)) is bool
        and len(doc.get("toys", [])) <= 3
        and all(isinstance(t, str) and len(t) <= 12 for t in doc.get("toys", []))
        and list(doc) == [k for k in props if k in doc]  # the schema's order
    )  # fmt: skip


def _prompt(llm) -> str:
    return llm.apply_chat_template([{"role": "user", "content": ASK}])


@pytest.mark.parametrize("steps", ["sync", "async"])
def test_outputs_are_documents_the_schema_allows(smol_engines, steps) -> None:
    llm = smol_engines[steps]
    greedy = SamplingParams(temperature=0.0, max_tokens=120, guided_json=PET)
    hot = SamplingParams(temperature=1.2, n=4, seed=3, max_tokens=120, guided_json=PET)
    outs = [llm.generate([_prompt(llm)], greedy)[0].outputs[0]]
    outs += llm.generate([_prompt(llm)], hot)[0].outputs
    for out in outs:
        assert out.finish_reason == "stop", out
        assert out.token_ids[-1] in llm.engine.eos_ids
        assert _valid(json.loads(out.text)), out.text


def test_greedy_equals_guided_regex_with_the_schemas_regex(smol_llm) -> None:
    prompt = _prompt(smol_llm)
    by_schema = SamplingParams(temperature=0.0, max_tokens=120, guided_json=json.dumps(PET))
    by_regex = SamplingParams(temperature=0.0, max_tokens=120, guided_regex=schema_to_regex(PET))
    a, b = smol_llm.generate([prompt, prompt], [by_schema, by_regex])
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
