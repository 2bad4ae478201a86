"""bad_words end to end on the default model (greedy, CPU), with synchronous steps and with
async scheduling (whose newest sampled token is still on the device when the next step
samples): a banned word never appears, and the output is the plain one up to it."""

import pytest
from engine_testing import make_llm

from vllm_runner import SamplingParams
from vllm_runner.sample.bad_words import bad_word_token_ids

PROMPT = "The capital of France is"


def _ids(llm, **kw) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, **kw)
    return list(llm.generate([PROMPT], params)[0].outputs[0].token_ids)


def _holds(ids: list[int], seq: tuple[int, ...]) -> bool:
    n = len(seq)
    return any(tuple(ids[i : i + n]) == seq for i in range(len(ids) - n + 1))


def _word_of(llm, plain: list[int], length: int) -> str:
    """A text whose token sequences include a window of ``length`` tokens of ``plain``
    (decoding and re-encoding a window does not always give it back)."""
    tok = llm.get_tokenizer()
    for i in range(len(plain) - length + 1):
        text = tok.decode(plain[i : i + length])
        if text.strip() and tuple(plain[i : i + length]) in bad_word_token_ids(tok, [text]):
            return text
    raise AssertionError(f"no window of {length} tokens in {plain} round-trips")


def _first_end(ids: list[int], sequences) -> int:
    """Where the first of ``sequences`` to occur in ``ids`` ends (its last token's index)."""
    ends = [i + len(q) - 1 for q in sequences for i in range(len(ids) - len(q) + 1)
            if tuple(ids[i : i + len(q)]) == q]  # fmt: skip
    return min(ends)


@pytest.mark.parametrize("length", [1, 2, 3])
@pytest.mark.parametrize("steps", ["sync", "async"])
def test_a_bad_word_is_never_generated(smol_engines, steps: str, length: int) -> None:
    llm = smol_engines[steps]
    plain = _ids(llm)
    assert plain == _ids(smol_engines["sync"])  # (async scheduling changes no greedy token)
    word = _word_of(llm, plain, length)
    sequences = bad_word_token_ids(llm.get_tokenizer(), [word])
    got = _ids(llm, bad_words=[word])
    assert not any(_holds(got, seq) for seq in sequences), (word, got)
    # greedy: the plain tokens up to the first that would complete the word, then another
    k = _first_end(plain, sequences)
    assert got[:k] == plain[:k] and got[k] != plain[k], (word, k, plain, got)


def test_bad_words_need_a_tokenizer(llama_dir) -> None:
    """A folder with no tokenizer cannot make a word's tokens: refused, not ignored."""
    with pytest.raises(ValueError, match=r"bad_words \['x'\] need a tokenizer"):
        make_llm(llama_dir).generate([[1, 2, 3]], SamplingParams(max_tokens=5, bad_words=["x"]))


def test_an_empty_list_bans_nothing(smol_engines) -> None:
    llm = smol_engines["sync"]
    assert _ids(llm, bad_words=[]) == _ids(llm)
