"""guided_grammar end to end on the default model (CPU), with synchronous steps and with
async scheduling (which a grammar request turns off while it runs): every output is a whole
sentence of its grammar, then an EOS; greedy takes, at each step, the best of the allowed
tokens by HF transformers' logits on the same weights, the allowed ones found token by token
(each token's bytes fed to the recognizer); rows of other kinds batched beside it are
unchanged."""

import pytest
import torch
from engine_testing import make_llm

from vllm_runner import LLM, SamplingParams
from vllm_runner.sample.grammar_compile import Grammar, compile_grammar
from vllm_runner.sample.grammar_states import DEAD, GrammarCursor, GrammarStates
from vllm_runner.tokenizer import token_bytes

SUM = 'root ::= sum " = " num\nsum ::= sum " + " num | num\nnum ::= [1-9] [0-9]{0,2}'
SQL = r"""
root    ::= "SELECT " cols " FROM " name (" WHERE " name " = " value)? ";"
cols    ::= "*" | name (", " name)*
name    ::= [a-z]+
value   ::= [0-9]+ | "'" [A-Za-z ]* "'"
"""
CASES = [
    ("What is 2 + 3? Answer as an equation.", SUM),
    ("Write a SQL query that finds the users who live in Paris.", SQL),
]


def _prompt(llm: LLM, ask: str) -> str:
    messages = [{"role": "user", "content": ask}]
    return llm.get_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


@pytest.fixture(scope="module")
def pieces(smol_llm) -> list[bytes | None]:
    return token_bytes(smol_llm.get_tokenizer(), smol_llm.engine.runner.model.lm_head.vocab_size)


def _allowed_by_brute_force(states: GrammarStates, config: frozenset, pieces) -> list[int]:
    start = states.id(config)
    first = {b: states.step(start, b) != DEAD for b in range(256)}  # (a quick first cut)
    allowed = []
    for token, piece in enumerate(pieces):
        if piece and first[piece[0]] and GrammarCursor(states.grammar, config).feed(states, piece):
            allowed.append(token)
    return allowed


def _sentence(grammar: Grammar, text: str) -> bool:
    cursor = GrammarCursor(grammar)
    return cursor.feed(GrammarStates(grammar), text.encode()) and cursor.accepts


def _greedy_by_hf(
    hf, ids: list[int], grammar: Grammar, pieces, ends: list[int], max_tokens: int
) -> list[int]:
    out, states, cursor = [], GrammarStates(grammar), GrammarCursor(grammar)
    while len(out) < max_tokens and (not out or out[-1] not in ends):
        allowed = _allowed_by_brute_force(states, cursor.config, pieces)
        if cursor.accepts or not allowed:
            allowed += ends
        with torch.no_grad():
            logits = hf(torch.tensor([ids + out])).logits[0, -1]
        token = allowed[int(logits[allowed].argmax())]
        out.append(token)
        if token not in ends:
            assert cursor.feed(states, pieces[token])
    return out


@pytest.mark.parametrize(
    ("case", "steps"), [(0, "sync"), (0, "async"), (1, "sync")], ids=["sum", "sum-async", "sql"]
)
def test_greedy_takes_the_best_allowed_token_each_step(
    smol_engines, hf_smol, pieces, case, steps
) -> None:
    ask, grammar = CASES[case]
    llm = smol_engines[steps]
    prompt = _prompt(llm, ask)
    params = SamplingParams(temperature=0.0, max_tokens=30, guided_grammar=grammar)
    out = llm.generate([prompt], params)[0].outputs[0]
    ends = sorted(llm.engine.eos_ids)
    ids = llm.get_tokenizer().encode(prompt)
    compiled = compile_grammar(grammar)
    assert list(out.token_ids) == _greedy_by_hf(hf_smol, ids, compiled, pieces, ends, 30)
    assert _sentence(compiled, out.text) and out.finish_reason == "stop", out


@pytest.mark.parametrize("steps", ["sync", "async"])
def test_sampled_outputs_are_sentences_then_eos(smol_engines, steps) -> None:
    llm = smol_engines[steps]
    ask, grammar = CASES[1]
    params = SamplingParams(temperature=1.0, n=3, seed=0, max_tokens=60, guided_grammar=grammar)
    outs = llm.generate([_prompt(llm, ask)], params)[0].outputs
    for out in outs:
        assert _sentence(compile_grammar(grammar), out.text), out
        assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.eos_ids, out
    assert len({o.text for o in outs}) > 1
    assert llm.engine.num_host_bound == 0  # (steps overlap again once the request is done)


@pytest.mark.parametrize("steps", ["sync", "async"])
def test_batched_with_other_rows_each_is_as_alone(smol_engines, steps) -> None:
    """A grammar row, a plain greedy row, a sampled one and a regex row in one batch: each
    output is the one it has alone."""
    llm = smol_engines[steps]
    prompts = [_prompt(llm, ask) for ask, _ in CASES] + [_prompt(llm, "Say hi.")] * 2
    params = [
        SamplingParams(temperature=0.0, max_tokens=30, guided_grammar=SUM),
        SamplingParams(temperature=0.0, max_tokens=12),
        SamplingParams(temperature=0.8, seed=3, max_tokens=12),
        SamplingParams(temperature=0.0, max_tokens=12, guided_regex="(hi|hello)!"),
    ]
    together = llm.generate(prompts, params)
    for prompt, p, got in zip(prompts, params, together, strict=True):
        (alone,) = llm.generate([prompt], p)
        assert got.outputs[0].token_ids == alone.outputs[0].token_ids, p
    assert _sentence(compile_grammar(SUM), together[0].outputs[0].text)


def test_a_sentence_cut_by_max_tokens_is_a_prefix_of_one(smol_engines) -> None:
    llm = smol_engines["sync"]
    ask, grammar = CASES[1]
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=4, guided_grammar=grammar)
    out = llm.generate([_prompt(llm, ask)], params)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    compiled = compile_grammar(grammar)
    assert GrammarCursor(compiled).feed(GrammarStates(compiled), out.text.encode())
    assert out.text.startswith("SELECT")


def test_a_bad_grammar_is_refused_by_line_and_column(smol_llm) -> None:
    with pytest.raises(ValueError, match=r"guided_grammar: line 2, column 5: expected a string"):
        smol_llm.generate(["x"], SamplingParams(guided_grammar='root ::= "a"\nfoo ::'))
    with pytest.raises(ValueError, match="guided_regex cannot be combined with guided_grammar"):
        smol_llm.generate(["x"], SamplingParams(guided_grammar=SUM, guided_regex="a"))


def test_guided_grammar_needs_a_tokenizer(llama_dir) -> None:
    with pytest.raises(ValueError, match="guided_grammar needs a tokenizer"):
        make_llm(llama_dir).generate([[1, 2, 3]], SamplingParams(guided_grammar=SUM))
