"""Bad input on the offline engine: refused with the value and the limit named, and never
leaving work behind or disturbing the other requests of a call."""

import re

import numpy as np
import pytest
from engine_testing import GREEDY, make_llm, prompts

from vllm_runner import SamplingParams


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt=[]), "prompt is empty"),
        (dict(prompt=list(range(1, 600))), "599 tokens, but max_model_len is 512"),
        (dict(prompt=[1, 99999]), "99999 is outside the vocabulary"),
        (dict(prompt=[1, 2], stop_token_ids=[5, 169752593]), "entry 169752593 is outside"),
    ],
)
def test_bad_prompts_raise_and_do_not_disturb(llama_dir, bad, match):
    llm = make_llm(llama_dir)
    params = SamplingParams(
        max_tokens=24,
        temperature=0.0,
        ignore_eos=True,
        stop_token_ids=bad.get("stop_token_ids"),
        min_tokens=2,
    )
    with pytest.raises(ValueError, match=match):
        llm.generate([[1, 2, 3], bad["prompt"]], [GREEDY, params])
    assert llm.stats()["num_waiting"] == 0  # nothing was half-added
    assert len(llm.generate([[1, 2, 3]], GREEDY)[0].token_ids) == 24


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("max_tokens", 0, "max_tokens must be an integer >= 1, got 0"),
        # (it said "must be >= 1, got 8.0")
        ("max_tokens", 8.0, "max_tokens must be an integer >= 1, got 8.0"),
        ("min_tokens", 1.5, "min_tokens must be an integer >= 0, got 1.5"),
        ("temperature", -0.5, "temperature must be a finite number >= 0, got -0.5"),
        ("temperature", float("inf"), "temperature must be a finite number >= 0, got inf"),
        ("temperature", float("nan"), "temperature must be a finite number >= 0, got nan"),
        # an int beyond float range: torch's conversion failed the whole step, not the request
        pytest.param(
            "temperature",
            10**400,
            "temperature must be a finite number >= 0, got 10",
            id="temperature-int-beyond-float",
        ),
        ("top_p", 0.0, r"top_p must be in \(0, 1\], got 0.0"),
        ("top_p", 1.5, r"top_p must be in \(0, 1\], got 1.5"),
        ("n", 0, "n must be an integer >= 1"),
        # an int64 tensor downstream: an overflow there failed the whole step
        ("top_k", 2**63, r"top_k must be -1, 0 \(off\) or in \[1, 9223372036854775807\]"),
        # a bool is not read as an integer (logprobs=True reached torch.topk and failed the
        # step; vLLM reads True as 1 there, see test_sampling_params)
        ("logprobs", False, r"logprobs must be an integer in \[0, 20\], got False"),
        ("max_tokens", True, "max_tokens must be an integer >= 1, got True"),
        ("n", True, "n must be an integer >= 1, got True"),
        ("stop", [7], r"stop must be non-empty strings, got \[7\]"),
        ("stop", [b"x"], "stop must be non-empty strings"),
        # (not a TypeError of list())
        ("stop", 5, "stop must be a string or a list of strings, got 5"),
        ("stop_token_ids", 7, r"stop_token_ids must be a list of token ids, got 7"),
        ("stop_token_ids", ["a"], "stop_token_ids entry must be a token id .*, got 'a'"),
        ("stop_token_ids", [1.5], "stop_token_ids entry must be a token id .*, got 1.5"),
        ("temperature", "0.5", "temperature must be a number, got '0.5'"),
        ("presence_penalty", None, "presence_penalty must be a number, got None"),
        ("ignore_eos", "no", "ignore_eos must be True or False, got 'no'"),
        ("skip_special_tokens", 0, "skip_special_tokens must be True or False, got 0"),
        ("include_stop_str_in_output", None, "include_stop_str_in_output must be True or"),
    ],
)
def test_bad_sampling_params(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value})


def test_numpy_integers_are_integers_as_in_vllm(llama_dir):
    """Integer settings from numpy (lengths drawn with np.random, say) are taken as vLLM
    takes them, as Python ints (they were refused: "max_tokens must be >= 1, got 8")."""
    params = SamplingParams(
        n=np.int32(2), max_tokens=np.int64(8), top_k=np.int64(5), min_tokens=np.int64(1),
        logprobs=np.int64(1), prompt_logprobs=np.int64(0), seed=np.int64(3),
        stop_token_ids=[np.int64(383)], ignore_eos=True,
    )  # fmt: skip
    for name in ("n", "max_tokens", "top_k", "min_tokens", "logprobs", "prompt_logprobs", "seed"):
        assert type(getattr(params, name)) is int, name
    assert [type(t) for t in params.stop_token_ids] == [int]
    (out,) = make_llm(llama_dir).generate([[1, 2, 3]], params)
    assert [len(c.token_ids) <= 8 for c in out.outputs] == [True, True]


def test_bad_prompt_token_ids_are_refused(llama_dir):
    llm = make_llm(llama_dir)
    for ids, match in (([1, True], "prompt token id True is not an integer"),
                       ([1, 2.0], "prompt token id 2.0 is not an integer")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            llm.generate([[1, 2, 3], ids], GREEDY)
    assert len(llm.generate([[1, 2, 3]], GREEDY)[0].token_ids) == 24


def test_a_failed_add_leaves_no_request_for_a_later_call(llama_dir, monkeypatch):
    """An add that fails part-way through a generate() call (past validation) aborts the
    requests added before it, so the next call computes its own requests only."""
    llm = make_llm(llama_dir)
    add, calls = llm.engine.add_request, []

    def failing_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("add failed")
        return add(*args, **kw)

    monkeypatch.setattr(llm.engine, "add_request", failing_third)
    with pytest.raises(RuntimeError, match="add failed"):
        llm.generate(prompts(4, seed=3), GREEDY)
    assert not llm.engine.has_unfinished() and llm.stats()["kv_blocks_used"] == 0
    monkeypatch.setattr(llm.engine, "add_request", add)
    out = llm.generate([[1, 2, 3]], GREEDY)
    assert len(out) == 1 and len(out[0].token_ids) == 24
    assert llm.engine.pop_finished() == []  # each call takes its own finished requests


def test_every_prompt_is_checked_before_any_is_added(llama_dir, monkeypatch):
    """A bad prompt after good ones: refused before the engine gets any of them (none
    added, then aborted)."""
    llm = make_llm(llama_dir)
    add, added = llm.engine.add_request, []

    def recorded(*args, **kw):
        added.append(args)
        return add(*args, **kw)

    monkeypatch.setattr(llm.engine, "add_request", recorded)
    with pytest.raises(ValueError, match="99999 is outside the vocabulary"):
        llm.generate([[1, 2, 3], [4, 5], [1, 99999]], GREEDY)
    assert added == []


def test_request_larger_than_the_whole_kv_cache_is_refused(llama_dir):
    """A request that could never fit in the KV cache gets a clear error instead of waiting
    forever at the head of the queue; one that fits (exactly) still runs."""
    llm = make_llm(llama_dir, num_kv_blocks=4)  # 64 tokens of KV
    fits = SamplingParams(max_tokens=33, temperature=0.0, ignore_eos=True)  # 32 + 33 - 1 = 64
    with pytest.raises(ValueError, match=r"needs up to 5 KV-cache blocks of 16 tokens "
                       r"\(32 prompt \+ 34 new tokens\), but the cache has 4"):  # fmt: skip
        llm.generate([list(range(1, 33))], SamplingParams(max_tokens=34, ignore_eos=True))
    out = llm.generate([list(range(1, 33))], fits)
    assert len(out[0].token_ids) == 33 and llm.stats()["kv_blocks_used"] == 0


def test_a_tokenizer_that_failed_to_load_is_not_called_missing(llama_dir, tmp_path):
    """A folder whose tokenizer fails to load runs on token ids; text, stop strings and chat
    are refused saying so (they said the folder had no tokenizer, or no chat template)."""
    import shutil

    shutil.copytree(llama_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "tokenizer.json").write_text("{not json")
    llm = make_llm(str(tmp_path))
    assert llm.tokenizer is None
    calls = [
        lambda: llm.generate("hi", GREEDY),
        lambda: llm.generate([[1, 2]], SamplingParams(stop=["x"])),
        lambda: llm.chat([{"role": "user", "content": "hi"}]),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="no usable tokenizer .none in its folder, or it"):
            call()
    assert len(llm.generate([[1, 2, 3]], GREEDY)[0].token_ids) == 24


def test_sampling_params_of_another_type_are_refused_naming_it(llama_dir):
    """A dict, a string or a number as `sampling_params` is refused naming its type (a dict
    or a string was iterated: "got 2 SamplingParams for 1 prompts"; a number failed in
    list()), and so is a list entry that is not SamplingParams; a prompt of another type too."""
    llm = make_llm(llama_dir)
    for params, kind in (({"max_tokens": 4, "temperature": 0}, "dict"), ("abc", "str"),
                         (5, "int"), ([GREEDY, None], "NoneType")):  # fmt: skip
        with pytest.raises(ValueError, match=f"SamplingParams or a list of them .*, got {kind}"):
            llm.generate([[1, 2, 3], [4, 5]], params)
    with pytest.raises(ValueError, match="prompt must be a string or a list of token ids, got int"):
        llm.generate(5, GREEDY)  # (not a TypeError of list())
    assert llm.stats()["num_waiting"] == 0


def test_the_fields_the_engine_fills_are_not_settings():
    """`all_stop_token_ids` and `eos_token_id` are the model's, written by the engine: given
    to SamplingParams they are refused naming them (they were taken, then overwritten)."""
    for name, value in (("eos_token_id", 5), ("all_stop_token_ids", {5})):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
            SamplingParams(**{name: value})


def _inputs(serving: bool, max_model_len: int = 64, num_blocks: int = 8):
    from vllm_runner.engine.input_processor import EngineLimits, InputProcessor

    limits = EngineLimits("", max_model_len, vocab_size=100, block_size=16,
                          num_blocks=num_blocks, serving=serving)  # fmt: skip
    return InputProcessor(limits, None)


def test_length_errors_name_the_lengths_and_max_model_len():
    online, offline = _inputs(serving=True), _inputs(serving=False)
    online.validate([1] * 54, SamplingParams(max_tokens=10))  # 64: fits exactly
    for inputs, prompt, max_tokens, says in (
        (online, 54, 11, "max_tokens 11 does not fit: max_model_len is 64 tokens, but 65 were "
                         "requested (54 in the prompt)"),
        (online, 64, None, "prompt has 64 tokens, but max_model_len is 64 (prompt + at least "
                           "one new token must fit)"),
        (offline, 65, None, "prompt has 65 tokens, but max_model_len is 64 (a prompt may have "
                            "that many tokens at most)"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(says)):
            inputs.validate([1] * prompt, SamplingParams(max_tokens=max_tokens))


def test_a_prompt_of_max_model_len_tokens_needs_the_kv_of_each_of_them():
    """Offline, a prompt of max_model_len tokens gets one new token (whose KV is never
    written), but each prompt token's KV is: 17 need 2 blocks of 16."""
    inputs = _inputs(serving=False, max_model_len=17, num_blocks=1)
    assert inputs.max_new_tokens(17, SamplingParams(max_tokens=None)) == 1
    with pytest.raises(ValueError, match=re.escape("needs up to 2 KV-cache blocks of 16 tokens "
                                                   "(17 prompt + 1 new tokens), but the cache "
                                                   "has 1")):  # fmt: skip
        inputs.validate(list(range(17)), SamplingParams(max_tokens=None))
    inputs.validate(list(range(16)), SamplingParams(max_tokens=None))  # 16 + 1 - 1: one block
