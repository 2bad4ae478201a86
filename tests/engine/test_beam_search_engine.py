"""Beam search through the engine: on the default model (CPU, fp32) the beams equal HF
transformers' ``generate(num_beams=...)`` on the same weights when no end token finishes a
beam (HF's handling of finished beams differs from vLLM's, which this follows); AsyncLLM's
search equals LLM's; a prompt with no room for ``max_tokens`` is refused before any round."""

import asyncio

import pytest
import torch
from engine_testing import make_llm

from vllm_runner import BeamSearchParams
from vllm_runner.engine.errors import ContextLengthError

PROMPTS = ["The capital of France is", "Once upon a time"]


@pytest.fixture(scope="module")
def hf_smol(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("width", [2, 3])
def test_beams_equal_hf_generate_when_none_ends(smol_llm, hf_smol, width) -> None:
    tok = smol_llm.get_tokenizer()
    params = BeamSearchParams(beam_width=width, max_tokens=6, ignore_eos=True)
    outs = smol_llm.beam_search(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = tok.encode(prompt)
        hf = hf_smol.generate(
            torch.tensor([ids]), num_beams=width, num_return_sequences=width, do_sample=False,
            max_new_tokens=6, min_new_tokens=6, length_penalty=1.0, early_stopping=False,
            output_scores=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
        assert [s.output_token_ids for s in out.sequences] == [
            row[len(ids) :] for row in hf.sequences.tolist()
        ]
        # HF's score is the sum over the 6 new tokens' count, vLLM's over the whole length
        for seq, hf_score in zip(out.sequences, hf.sequences_scores.tolist(), strict=True):
            assert seq.cum_logprob == pytest.approx(hf_score * 6, abs=1e-3)
            assert seq.tokens[: len(ids)] == ids and len(seq.logprobs) == 6
            assert seq.text == tok.decode(seq.tokens) and seq.finish_reason == "length"


def test_a_beam_that_ends_is_kept_with_its_end_token(smol_llm) -> None:
    """The instruct model ends "Paris." with its end token: that beam finishes ("stop")
    while the others run to max_tokens; every sequence's cum_logprob is its tokens' sum."""
    outs = smol_llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=3, max_tokens=12))
    (out,) = outs
    reasons = [s.finish_reason for s in out.sequences]
    assert "stop" in reasons and len(out.sequences) == 3
    for seq in out.sequences:
        new = seq.output_token_ids
        assert seq.cum_logprob == pytest.approx(
            sum(top[t] for t, top in zip(new, seq.logprobs, strict=True))
        )
        if seq.finish_reason == "stop":
            assert new[-1] in smol_llm.engine.eos_ids and len(new) < 12
        else:
            assert len(new) == 12 and not set(new) & smol_llm.engine.eos_ids


def test_async_llm_searches_as_llm_does(llama_dir, tiny_async) -> None:
    """The tiny Llama has no tokenizer: token-id prompts, no text."""
    params = BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True, length_penalty=0.5)
    prompts = [[1, 5, 9, 2], [7, 7, 3]]
    want = make_llm(llama_dir).beam_search(prompts, params)
    got = asyncio.run(tiny_async.beam_search(prompts, params))
    for a, b in zip(want, got, strict=True):
        assert [(s.tokens, s.text) for s in a.sequences] == [(s.tokens, None) for s in b.sequences]
        assert [s.cum_logprob for s in a.sequences] == pytest.approx(
            [s.cum_logprob for s in b.sequences], abs=1e-5
        )


def test_a_prompt_without_room_for_max_tokens_is_refused(llama_dir) -> None:
    llm = make_llm(llama_dir, max_model_len=32)
    with pytest.raises(
        ContextLengthError,
        match="a prompt of 29 tokens \\+ max_tokens 8 = 37 do not fit max_model_len 32",
    ):
        llm.beam_search([[1, 2], list(range(1, 30))], BeamSearchParams(2, max_tokens=8))
    assert not llm.engine.has_unfinished()


def test_a_cancelled_search_leaves_no_request_behind(tiny_async) -> None:
    """A client gone mid-search cancels it (the routes' until_disconnect): the round's beams
    are aborted and their blocks freed."""

    async def main() -> dict:
        params = BeamSearchParams(beam_width=4, max_tokens=200, ignore_eos=True)
        before = tiny_async.stats()["generation_tokens_total"]
        search = asyncio.ensure_future(tiny_async.beam_search([[3, 1, 4, 1, 5]], params))
        # two rounds done: the next one (rounds run back to back) is in the engine
        while tiny_async.stats()["generation_tokens_total"] < before + 8:
            await asyncio.sleep(0.001)
        search.cancel()
        with pytest.raises(asyncio.CancelledError):
            await search
        for _ in range(200):
            stats = tiny_async.stats()
            if stats["num_running"] == stats["num_waiting"] == stats["kv_blocks_used"] == 0:
                break
            await asyncio.sleep(0.01)
        return stats

    stats = asyncio.run(main())
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["kv_blocks_used"] == 0
