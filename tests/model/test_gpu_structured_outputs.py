"""Structured outputs through the engine on a GPU (pytest -m gpu): a random Llama with a
byte-level BPE tokenizer trained here on JSON-like text; guided_json outputs are whole
documents the schema allows, guided_regex outputs match, guided_grammar outputs are whole
sentences of their grammar (left recursion rewritten), a plain request beside them is
unchanged by their masks (the synchronous steps they force), and CUDA graphs == eager. fp32,
so that a plain row's greedy tokens do not depend on the rows beside it (the half-precision
sampler path: tests/kernels/test_sampler_processors_gpu.py)."""

import json
import re

import pytest
import torch

from vllm_runner import LLM, SamplingParams
from vllm_runner.sample.grammar_compile import compile_grammar
from vllm_runner.sample.grammar_states import GrammarCursor, GrammarStates

pytestmark = pytest.mark.gpu
SCHEMA = {"type": "object", "required": ["name", "kind", "n"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "kind": {"enum": ["cat", "dog"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"type": "boolean"},
                                  "maxItems": 3}}}  # fmt: skip
PHONE = r"[0-9]{3}-[0-9]{4}"
PET = r"""
root ::= "{\"name\": \"" [a-z0-9]{1,12} "\", \"n\": " num ", \"tags\": [" tags? "]}"
num  ::= [0-9] | [1-9] [0-9]
tags ::= tags ", " bool | bool
bool ::= "true" | "false"
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    if not torch.cuda.is_available():
        pytest.fail("the gpu suite needs a CUDA device")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [json.dumps({"name": f"pet{i}", "kind": "cat", "n": i, "tags": [True, False]})
              for i in range(200)] + ["the quick brown fox 123-4567 jumps"] * 20  # fmt: skip
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    path = str(tmp_path_factory.mktemp("structured"))
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return path


def _valid(doc: dict) -> bool:
    return (
        set(doc) <= set(SCHEMA["properties"]) and {"name", "kind", "n"} <= set(doc)
        and isinstance(doc["name"], str) and len(doc["name"]) <= 12
        and doc["kind"] in ("cat", "dog") and type(doc["n"]) is int and 0 <= doc["n"] <= 99
        and all(type(t) is bool for t in doc.get("tags", [])) and len(doc.get("tags", [])) <= 3
    )  # fmt: skip


def _run(llm: LLM) -> list[list[int]]:
    prompts = ["a pet:", "another", "the quick brown fox", "one more pet:"]
    params = [
        SamplingParams(temperature=0.0, max_tokens=300, guided_json=SCHEMA),
        SamplingParams(temperature=1.0, seed=1, n=3, max_tokens=300, guided_json=SCHEMA),
        SamplingParams(temperature=0.0, max_tokens=40, guided_regex=PHONE),
        SamplingParams(temperature=0.0, max_tokens=300, guided_grammar=PET),
    ]
    outs = llm.generate(prompts, params)
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(["jumps over"], plain)[0].outputs[0].token_ids
    beside = llm.generate(["jumps over", *prompts], [plain, *params])[0].outputs[0].token_ids
    assert beside == alone  # (a plain row's tokens with guided rows in its steps)
    for out in [c for o in outs[:2] for c in o.outputs]:
        assert out.finish_reason == "stop" and _valid(json.loads(out.text)), out.text
    assert re.fullmatch(PHONE, outs[2].outputs[0].text), outs[2].outputs[0].text
    grammar = compile_grammar(PET)
    cursor, text = GrammarCursor(grammar), outs[3].outputs[0].text
    assert cursor.feed(GrammarStates(grammar), text.encode()) and cursor.accepts, text
    return [c.token_ids for o in outs for c in o.outputs]


def test_structured_outputs_on_the_gpu_with_and_without_graphs(model_dir) -> None:
    kw = {"device": "cuda", "dtype": "float32", "max_model_len": 1024,
          "gpu_memory_utilization": 0.2}  # fmt: skip
    graphs = _run(LLM(model_dir, **kw))
    eager = _run(LLM(model_dir, enforce_eager=True, **kw))
    assert graphs[0] == eager[0] and graphs[-2:] == eager[-2:]  # (greedy rows)
