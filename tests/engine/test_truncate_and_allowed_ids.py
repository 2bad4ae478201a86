"""vLLM's truncate_prompt_tokens (only the prompt's last k tokens are used) and
allowed_token_ids (only those tokens may be sampled), offline and through AsyncLLM."""

import asyncio
import dataclasses
import re

import pytest
from engine_testing import GREEDY, make_llm, prompts

from vllm_runner import AsyncLLM, SamplingParams

CHAT = [{"role": "user", "content": "Name three colours of the rainbow, please."}]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return make_llm(llama_dir)


@pytest.fixture(scope="module")
def smol_async(default_model_dir):
    engine = AsyncLLM(
        model_name=default_model_dir, dtype="float32", device="cpu", max_model_len=1024,
        cpu_kv_cache_gb=0.25,
    )  # fmt: skip
    yield engine
    asyncio.run(engine.shutdown())


def greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 8, "temperature": 0.0, "ignore_eos": True, **kw})


def test_truncate_prompt_tokens_keeps_the_last_k_token_ids(llm):
    prompt = prompts(1, seed=4)[0]  # 5 to 60 tokens
    assert len(prompt) > 5
    (cut,) = llm.generate([prompt], greedy(truncate_prompt_tokens=5))
    (tail,) = llm.generate([prompt[-5:]], greedy())
    assert cut.prompt_token_ids == prompt[-5:] and cut.token_ids == tail.token_ids
    (short,) = llm.generate([prompt[:3]], greedy(truncate_prompt_tokens=5))
    assert short.prompt_token_ids == prompt[:3]
    # -1: max_model_len (512) tokens, as vLLM, which leave room for one new token (offline)
    assert llm.generate([prompt], greedy(truncate_prompt_tokens=-1))[0].prompt_token_ids == prompt
    long = prompts(1)[0] * 20
    (cut,) = llm.generate([long], greedy(truncate_prompt_tokens=-1))
    assert cut.prompt_token_ids == long[-512:] and len(cut.token_ids) == 1
    (cut,) = llm.generate([long], greedy(truncate_prompt_tokens=500))
    assert cut.prompt_token_ids == long[-500:]
    (cut,) = llm.generate([long], greedy(truncate_prompt_tokens=512))  # (max_model_len: taken)
    assert cut.prompt_token_ids == long[-512:] and len(cut.token_ids) == 1


@pytest.mark.parametrize(
    "k, match",
    [
        (513, r"truncate_prompt_tokens 513 is more than max_model_len \(512\)"),
        (0, "truncate_prompt_tokens must be -1 or an integer >= 1, got 0"),
        (-2, "truncate_prompt_tokens must be -1 or an integer >= 1, got -2"),
        (True, "truncate_prompt_tokens must be -1 or an integer >= 1, got True"),
    ],
)
def test_bad_truncate_prompt_tokens_are_refused(llm, k, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([[1, 2, 3]], greedy(truncate_prompt_tokens=k))
    assert llm.stats()["num_waiting"] == 0


def test_text_and_chat_prompts_are_truncated_after_tokenizing(smol_llm, smol_async):
    """A text's ids (BOS included where the tokenizer adds one) and, as vLLM's chat route,
    the templated conversation's ids are cut to their last k."""
    tok = smol_llm.get_tokenizer()
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    ids = tok.encode(text)
    (out,) = smol_llm.generate([text], greedy(truncate_prompt_tokens=4))
    assert out.prompt_token_ids == ids[-4:] and out.prompt == text
    templated = smol_llm.apply_chat_template(CHAT, add_generation_prompt=True)
    chat_ids = tok.encode(templated, add_special_tokens=False)
    (chat,) = smol_llm.chat(CHAT, greedy(truncate_prompt_tokens=6))
    assert chat.prompt_token_ids == chat_ids[-6:]

    async def run():
        (done,) = await smol_async.generate([text], greedy(truncate_prompt_tokens=4))
        updates = [u async for u in smol_async.stream(text, greedy(truncate_prompt_tokens=4))]
        return done, updates

    done, updates = asyncio.run(run())
    assert done.prompt_token_ids == ids[-4:] and done.outputs[0].token_ids == out.token_ids
    assert all(u.prompt_token_ids == ids[-4:] for u in updates)
    assert (
        smol_async.validate(templated, greedy(truncate_prompt_tokens=6), chat=True)
        == (chat_ids[-6:])
    )


def test_allowed_token_ids_restrict_greedy_and_sampled_tokens(llm):
    allowed = [11, 200, 383]
    for params in (greedy(allowed_token_ids=allowed),
                   SamplingParams(max_tokens=16, ignore_eos=True, allowed_token_ids=allowed),
                   SamplingParams(max_tokens=16, ignore_eos=True, allowed_token_ids=allowed,
                                  repetition_penalty=1.5, top_p=0.9, seed=3)):  # fmt: skip
        outs = llm.generate(prompts(3, seed=1), params)
        assert all(set(o.token_ids) <= set(allowed) for o in outs), params
    (one,) = llm.generate([[1, 2, 3]], greedy(allowed_token_ids=[42]))
    assert one.token_ids == [42] * 8


def test_allowed_token_ids_keep_raw_logprobs_and_min_tokens(llm):
    (free,) = llm.generate([[5, 6, 7]], greedy(max_tokens=1, logprobs=5))
    worst = min(free.outputs[0].logprobs[0], key=free.outputs[0].logprobs[0].get)
    (held,) = llm.generate([[5, 6, 7]], greedy(max_tokens=1, logprobs=5, allowed_token_ids=[worst]))
    assert held.token_ids == [worst]
    assert held.outputs[0].logprobs[0] == free.outputs[0].logprobs[0]
    # min_tokens still bans the stop ids among the allowed ones
    stop = free.token_ids[0]
    params = SamplingParams(max_tokens=6, temperature=0.0, min_tokens=4, stop_token_ids=[stop],
                            allowed_token_ids=[stop, 99])  # fmt: skip
    (out,) = llm.generate([[5, 6, 7]], params)
    assert out.token_ids[:4] == [99] * 4


@pytest.mark.parametrize(
    "allowed, match",
    [
        ([], "allowed_token_ids must be a non-empty list of token ids, got"),
        (5, "allowed_token_ids must be a non-empty list of token ids, got 5"),
        ([1, -3], r"allowed_token_ids entry must be a token id \(an integer >= 0\), got -3"),
        ([1, True], "allowed_token_ids entry must be a token id .*, got True"),
        ([1, 384], r"allowed_token_ids entry 384 is outside the vocabulary \[0, 384\)"),
    ],
)
def test_bad_allowed_token_ids_are_refused(llm, allowed, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([[1, 2, 3]], greedy(allowed_token_ids=allowed))
    assert len(llm.generate([[1, 2, 3]], GREEDY)[0].token_ids) == 24


@pytest.mark.parametrize(
    "kw, banned",
    [
        ({"allowed_token_ids": [42], "stop_token_ids": [42]}, "[42]"),
        ({"allowed_token_ids": [2]}, "[2]"),  # the tiny llama's EOS id
        ({"allowed_token_ids": [2], "ignore_eos": True}, "[2]"),  # min_tokens bans EOS too
        ({"allowed_token_ids": [42, 2, 2], "stop_token_ids": [42, 7]}, "[2, 42]"),
    ],
)
def test_allowed_token_ids_that_min_tokens_bans_are_refused(llm, kw, banned):
    """Until min_tokens is reached stop and EOS ids are banned: with nothing else allowed no
    token could be sampled (token 0, outside the allowed set, was)."""
    params = SamplingParams(max_tokens=4, temperature=0.0, min_tokens=2, **kw)
    with pytest.raises(ValueError, match=rf"allowed_token_ids .*{re.escape(banned)}.*min_tokens"):
        llm.generate([[1, 2, 3]], params)
    assert llm.stats()["num_waiting"] == 0
    # one allowed id min_tokens does not ban: that one, then the stop id
    (out,) = llm.generate([[1, 2, 3]], dataclasses.replace(params, allowed_token_ids=[2, 42, 9]))
    assert out.token_ids[:2] == [9, 9] and set(out.token_ids) <= {2, 42, 9}
    # min_tokens 0: the stop / EOS ids may be sampled at once
    (out,) = llm.generate([[1, 2, 3]], dataclasses.replace(params, min_tokens=0))
    assert set(out.token_ids) <= set(kw["allowed_token_ids"])


def test_a_text_too_long_to_fit_is_served_when_truncated(smol_llm):
    """As vLLM: the whole text is tokenized, then cut to its last k ids; the character bound
    that refuses a text max_model_len could not hold (untokenized) must not refuse it."""
    inputs = smol_llm.engine.inputs
    text = "the lazy dog " * (inputs.max_prompt_chars // 13 + 10)
    assert len(text) > inputs.max_prompt_chars
    ids = smol_llm.get_tokenizer().encode(text)
    (out,) = smol_llm.generate([text], greedy(max_tokens=1, truncate_prompt_tokens=8))
    assert out.prompt_token_ids == ids[-8:]
