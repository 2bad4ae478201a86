"""guided_grammar's masks: each parser state's mask against feeding every token's bytes to
the recognizer one by one, the end tokens' rules, the cache by (grammar, state), the bounds
on a pass's work and on the states kept, the replay after a preemption, and the sampler
keeping to the grammar greedy and hot."""

import numpy as np
import pytest
import torch
from grammar_samples import SAMPLES

from vllm_runner.sample import grammar_states
from vllm_runner.sample.grammar_compile import compile_grammar
from vllm_runner.sample.grammar_masks import GrammarMasks, allowed_tokens, apply_guided_grammar
from vllm_runner.sample.grammar_states import GrammarCursor, GrammarStates
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sample.token_masks import TokenBytes
from vllm_runner.sampling_params import SamplingParams

# A hand-made vocabulary for the sample grammars: words and their pieces, tokens across the
# rules' parts, a character split across tokens ("é" is C3 A9), and single bytes enough to
# write every sentence; None: special tokens (0 is EOS).
PIECES = [None, b'{"', b'"', b"name", b'": ', b'": "', b" ", b"\n", b"[", b"]", b"}", b"},",
          b"}]", b"{", b"1", b"2", b"2.5", b"0", b"-", b"e", b"E+", b"true", b"tr", b"ue",
          b"null", b",", b', "', b"\\", b'\\"', b"u00", b"e9", b"\xc3", b"\xa9", b"\xc3\xa9",
          b"a", b"b", b"x", b"(", b")", b"((", b"+", b"*", b"/", b"12", b".", b"SELECT ",
          b"SEL", b"ECT", b" FROM", b" FROM ", b"users", b"_id", b" WHERE ", b" AND ", b"=",
          b">=", b"'", b"'Paris'", b";", b"; ", b" LIMIT ", b"10", b"COUNT(*)", b" AS ",
          b"*", b", ", b"", None, b"\t\t\t\t\t\t\t\t\t",
          *(bytes([c]) for c in b"WHERODBYLIMTNUSACGFnrtfls/")]  # fmt: skip
EOS = 0
VOCAB = TokenBytes(PIECES)


def _brute_force(grammar, config: frozenset) -> np.ndarray:
    """Each token's bytes fed to a cursor at ``config`` (fresh states: one transition at a
    time, never a row of the table)."""
    states = GrammarStates(grammar)
    out = []
    for piece in PIECES:
        cursor = GrammarCursor(grammar, config)
        out.append(bool(piece) and cursor.feed(states, piece))
    return np.array(out)


def _configs(grammar, text: bytes) -> list[frozenset]:
    """The parser states after each prefix of ``text``."""
    states, cursor = GrammarStates(grammar), GrammarCursor(grammar)
    out = [cursor.config]
    for byte in text:
        assert cursor.feed(states, bytes([byte]))
        out.append(cursor.config)
    return out


@pytest.mark.parametrize("name", list(SAMPLES))
def test_every_states_mask_is_every_token_that_leaves_a_parse(name: str) -> None:
    grammar_text, sentence = SAMPLES[name]
    grammar = compile_grammar(grammar_text)
    states = GrammarStates(grammar)
    configs = _configs(grammar, sentence.encode())
    for config in dict.fromkeys(configs):  # (in order, once each)
        got = allowed_tokens(VOCAB, states, states.id(config))
        want = _brute_force(grammar, config)
        assert (got == want).all(), (name, np.flatnonzero(got != want))
    assert allowed_tokens(VOCAB, states, states.id(configs[0])).any()


def _row(output: list[int], grammar: str, **kwargs) -> SamplingRow:
    params = SamplingParams(**{"temperature": 0.0, "guided_grammar": grammar, **kwargs})
    params.all_stop_token_ids = {EOS}
    return SamplingRow(params, [7, 7, *output], 2, None)


def _ids(pieces: list[bytes]) -> list[int]:
    return [PIECES.index(p) for p in pieces]


def _allowed(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(r).nonzero()[:, 0].tolist()) for r in logits]


PAIRS = 'root ::= ("ab" | "x") ("ab" | "x")?'


def test_end_tokens_exactly_where_the_text_is_a_sentence() -> None:
    """Row 0 is inside "ab" (no end token); row 1 is a sentence ("x") that may go on, or end
    (EOS, or its stop token id 6, a " " the grammar never takes); row 2 is one nothing
    continues (only end tokens); row 3 ended by EOS (not masked); row 4 is plain."""
    masks = GrammarMasks(VOCAB)
    rows = [
        _row(_ids([b"a"]), PAIRS),
        _row(_ids([b"x"]), PAIRS, stop_token_ids=[6]),
        _row(_ids([b"x", b"a", b"b"]), PAIRS),
        _row([*_ids([b"x"]), EOS], PAIRS),
        SamplingRow(SamplingParams(temperature=0.0), [7], 1, None),
    ]
    logits = torch.zeros(len(rows), len(PIECES))
    apply_guided_grammar(logits, rows, masks)
    allowed = _allowed(logits)
    assert allowed[0] == set(_ids([b"b"]))
    assert allowed[1] == {EOS, 6, *_ids([b"a", b"x"])}
    assert allowed[2] == {EOS}
    assert allowed[3] == allowed[4] == set(range(len(PIECES)))
    assert rows[3].grammar_cursor.ended and not rows[3].grammar_cursor.broken
    assert rows[2].grammar_cursor.consumed == 3 and rows[2].grammar_cursor.accepts


def test_a_state_no_token_continues_ends_the_output() -> None:
    pieces = [None, b"a", b"bb"]
    row = _row([1], 'root ::= "ab"')
    logits = torch.zeros(1, len(pieces))
    apply_guided_grammar(logits, [row], GrammarMasks(TokenBytes(pieces)))
    assert _allowed(logits) == [{EOS}] and not row.grammar_cursor.accepts


def test_masks_are_cached_by_grammar_and_state_bounded() -> None:
    masks = GrammarMasks(VOCAB, cache_bytes=0)  # (16 masks at least)
    arithmetic = SAMPLES["arithmetic"][0]
    for grammar in (PAIRS, arithmetic, PAIRS):
        masks.get(masks.advance(_row([], grammar), {EOS}))
    start = compile_grammar(PAIRS).start
    assert list(masks.masks) == [(arithmetic, compile_grammar(arithmetic).start), (PAIRS, start)]
    row = _row([], SAMPLES["json"][0])
    for token in _ids([b"["]) * 16:  # (each depth a new state)
        row.token_ids.append(token)
        masks.get(masks.advance(row, {EOS}))
    assert len(masks.masks) == 16 and (PAIRS, start) not in masks.masks


def test_a_pass_over_its_budget_allows_fewer_tokens_never_others() -> None:
    """Past its budget a pass leaves the states it has not worked out as dead: its mask is
    a subset of the whole one (sound), and a later pass works them out."""
    grammar = compile_grammar(SAMPLES["json"][0])
    states = GrammarStates(grammar)
    start = states.id(grammar.start)
    few = allowed_tokens(VOCAB, states, start, budget=30)
    whole = allowed_tokens(VOCAB, states, start)
    assert few.sum() < whole.sum() and not (few & ~whole).any()
    assert (whole == _brute_force(grammar, grammar.start)).all()


def test_an_engines_states_start_again_past_their_bound(monkeypatch) -> None:
    monkeypatch.setattr(grammar_states, "MAX_STATES", 8)
    masks = GrammarMasks(VOCAB)
    grammar_text, sentence = SAMPLES["sql"]
    row = _row([], grammar_text)
    tokens = _ids([b"SELECT ", b"COUNT(*)", b" AS ", b"x", b" FROM ", b"users", b";"])
    seen = set()
    for token in [*tokens, EOS]:
        masks.get(masks.advance(row, {EOS}))
        seen.add(id(masks.grammars[grammar_text]))
        row.token_ids.append(token)
    masks.advance(row, {EOS})
    assert len(seen) > 1 and row.grammar_cursor.ended and not row.grammar_cursor.broken


def test_a_preempted_row_replays_its_output() -> None:
    masks = GrammarMasks(VOCAB)
    grammar = SAMPLES["json"][0]
    tokens = _ids([b'{"', b"name", b'": "', b"\xc3", b"\xa9", b'\\"', b'"', b", ", b'"', b"a",
                   b'": ', b"[", b"1", b", ", b"tr", b"ue", b"]"])  # fmt: skip
    row = _row(tokens[:4], grammar)
    masks.advance(row, {EOS})
    row.token_ids += tokens[4:]
    again = _row(tokens, grammar)  # a new runner row after a preemption: no cursor yet
    assert masks.advance(row, {EOS}).config == masks.advance(again, {EOS}).config
    text = b"".join(PIECES[t] for t in tokens)
    assert again.grammar_cursor.config == _configs(compile_grammar(grammar), text)[-1]
    assert again.grammar_cursor.consumed == len(tokens) and not again.grammar_cursor.accepts


def test_a_row_with_a_token_on_the_device_is_refused() -> None:
    row = _row([], PAIRS)
    row.num_pending = 1
    with pytest.raises(RuntimeError, match="guided_grammar: 1 tokens still on the device"):
        apply_guided_grammar(torch.zeros(1, len(PIECES)), [row], GrammarMasks(VOCAB))


@pytest.mark.parametrize("name", list(SAMPLES))
@pytest.mark.parametrize("temperature", [0.0, 2.0])
def test_sampling_keeps_to_the_grammar(name: str, temperature: float) -> None:
    """Through the sampler: random logits, at most 60 draws; every prefix is live, and a
    text that ended (EOS) is a whole sentence."""
    from vllm_runner.sample.sampler import Sampler

    sampler = Sampler(torch.device("cpu"), 0)
    sampler.grammar_masks = GrammarMasks(VOCAB)
    grammar_text = SAMPLES[name][0]
    grammar = compile_grammar(grammar_text)
    gen = torch.Generator().manual_seed(0)
    ended = 0
    for seed in range(8):
        row = _row([], grammar_text, temperature=temperature, seed=seed)
        for _ in range(60):
            logits = torch.randn(1, len(PIECES), generator=gen) * 4
            (token,) = sampler(logits, [row]).token_ids
            row.token_ids.append(token)
            if token == EOS:
                break
        out = row.output_token_ids
        text = b"".join(PIECES[t] for t in out if t != EOS)
        states = GrammarStates(grammar)
        cursor = GrammarCursor(grammar)
        assert cursor.feed(states, text), text
        if out[-1] == EOS:  # a sentence, or where no token of this vocabulary continues
            ended += cursor.accepts
            stuck = not allowed_tokens(VOCAB, states, states.id(cursor.config)).any()
            assert cursor.accepts or stuck, text
    assert ended > 0
