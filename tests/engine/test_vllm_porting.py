"""vLLM scripts ported as written: the attributes and calls they use on LLM, AsyncLLM and the
outputs (each failed here: AttributeError, or a call that did nothing)."""

import asyncio
import gc
import warnings
from types import SimpleNamespace

import pytest
from engine_testing import GREEDY, make_llm, prompts

from vllm_runner import LLM, AsyncLLM, CompletionOutput, EngineDeadError, SamplingParams


def test_llm_engine_as_vllm_scripts_read_it(llama_dir):
    """vLLM's `llm.llm_engine.model_config.max_model_len` (its benchmarks, eval harnesses),
    `.hf_config` and `llm.llm_engine.get_tokenizer()`. Only what a script reads: vLLM's
    LLMEngine request calls (add_request(request_id, prompt, params), step) are not there,
    rather than read with this engine's own arguments."""
    llm = make_llm(llama_dir, max_model_len=256)
    engine = llm.llm_engine
    assert engine.model_config.max_model_len == 256
    assert engine.model_config.hf_config.num_hidden_layers == 2
    assert engine.get_model_config() is engine.model_config
    assert engine.get_tokenizer() is llm.get_tokenizer() and engine.tokenizer is llm.tokenizer
    assert not hasattr(engine, "add_request") and not hasattr(engine, "step")


def test_a_completion_says_whether_it_finished_as_vllm():
    """vLLM's `CompletionOutput.finished()`: its finish_reason is set."""
    done = CompletionOutput(0, "a", [1], finish_reason="length")
    assert done.finished() is True
    assert CompletionOutput(0, "a", [1]).finished() is False


def _async_llm(llama_dir) -> AsyncLLM:
    return AsyncLLM(llama_dir, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)


def test_check_health_as_vllm(llama_dir):
    """vLLM's `await llm.check_health()` (a server's health route): None while the engine
    runs, EngineDeadError naming why once its loop has died; `errored` / `is_running` say
    the same."""
    llm = _async_llm(llama_dir)
    assert asyncio.run(llm.check_health()) is None
    assert llm.is_running and not llm.errored
    llm._send(("malformed",))  # the loop dies
    llm._thread.join()
    assert llm.errored and not llm.is_running
    with pytest.raises(EngineDeadError, match="the engine loop failed"):
        asyncio.run(llm.check_health())
    asyncio.run(llm.shutdown())
    with pytest.raises(RuntimeError):
        asyncio.run(llm.check_health())


def test_shutdown_called_as_vllm_does_stops_the_engine(llama_dir):
    """vLLM's `shutdown()` is a plain call: called so here (from a coroutine, or after the
    event loop ended), it did nothing but warn "coroutine never awaited" (the engine ran on,
    holding its memory). It stops the engine: from sync code it returns once the loop has
    ended; from a coroutine the loop ends on its own; neither warns. Awaited, as before."""

    async def main(llm: AsyncLLM) -> None:
        await llm.generate([[1, 2, 3]], GREEDY)
        llm.shutdown()  # (not awaited)
        assert not llm.is_running
        with pytest.raises(RuntimeError, match="AsyncLLM is shut down"):
            await llm.generate([[1, 2, 3]], GREEDY)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a coroutine never awaited warns when collected)
        in_loop = _async_llm(llama_dir)
        asyncio.run(main(in_loop))
        in_loop._thread.join(timeout=60)
        assert not in_loop._thread.is_alive()
        after_loop = _async_llm(llama_dir)
        asyncio.run(after_loop.generate([[1, 2, 3]], GREEDY))
        after_loop.shutdown()
        assert not after_loop._thread.is_alive()
        gc.collect()
    awaited = _async_llm(llama_dir)
    asyncio.run(awaited.shutdown())
    assert not awaited._thread.is_alive()
    asyncio.run(awaited.shutdown())  # (a second time: nothing to do)


def test_detokenize_false_gives_the_token_ids_alone_as_vllm(smol_llm):
    """vLLM's `SamplingParams(detokenize=False)` (its throughput benchmark passes it): the
    same tokens, no text; stop strings, which need the text, are refused naming it (it was
    a TypeError, an unknown argument)."""
    prompt = "The capital of France is"
    (text,) = smol_llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0))
    bare = SamplingParams(max_tokens=8, temperature=0.0, detokenize=False, logprobs=1)
    (ids,) = smol_llm.generate(prompt, bare)
    assert ids.outputs[0].token_ids == text.outputs[0].token_ids and text.outputs[0].text
    assert ids.outputs[0].text == "" and len(ids.outputs[0].logprobs) == 8
    # an AsyncLLM's front end, which builds the text of an engine process's requests: none
    front_end = SimpleNamespace(_client=object(), tokenizer=smol_llm.tokenizer)
    assert AsyncLLM._detokenizers_here(front_end, ids.prompt_token_ids, bare) is None
    with pytest.raises(ValueError, match=r"stop \['\.'\] needs detokenize=True, got False"):
        SamplingParams(stop=["."], detokenize=False)
    with pytest.raises(ValueError, match="detokenize must be True or False, got 'no'"):
        SamplingParams(detokenize="no")


def test_an_empty_text_prompt_is_its_bos_as_vllm(tmp_path, peaked_llama, smol_llm):
    """vLLM tokenizes an empty text: a tokenizer that adds BOS makes it [BOS] (generation
    from nothing, e.g. unconditional samples); one that adds nothing leaves no prompt, which
    is refused (an empty text was refused before tokenizing, whatever the tokenizer)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_llm.engine.model_config.path)
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    tokenizer.bos_token = "<|endoftext|>"
    path = peaked_llama(str(tmp_path), ("embed",), vocab_size=49152, hidden_size=32,
                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1)  # fmt: skip
    tokenizer.save_pretrained(path)
    (out,) = LLM(path, num_kv_blocks=16).generate("", SamplingParams(max_tokens=3))
    assert out.prompt_token_ids == [0] and out.prompt == "" and len(out.token_ids) >= 1
    with pytest.raises(ValueError, match="prompt is empty"):
        smol_llm.generate("", SamplingParams(max_tokens=3))
    dropped = smol_llm.engine.inputs.uncounted[0] * 3  # (characters of no token)
    with pytest.raises(ValueError, match="prompt is empty: it has 0 tokens"):
        smol_llm.generate(dropped, SamplingParams(max_tokens=3))


@pytest.mark.parametrize("chunked", [False, True])
def test_a_prompt_of_max_model_len_tokens_gives_one_token_offline_as_vllm(llama_dir, chunked):
    """vLLM's LLM refuses only a prompt longer than max_model_len: one of exactly that many
    tokens (what eval harnesses send for loglikelihoods, and what truncate_prompt_tokens=-1
    leaves of a longer one) gets one token, finish_reason "length". Both were refused here,
    so -1 refused every prompt it would cut. A server still refuses it (no room for
    max_tokens), as vLLM's."""
    step = dict(max_num_batched_tokens=16) if chunked else {}
    llm = make_llm(llama_dir, max_model_len=64, **step)
    whole = prompts(1, seed=3)[0] * 4
    assert len(whole) > 65
    (free,) = make_llm(llama_dir, max_model_len=128).generate([whole[-64:]], GREEDY)
    (out,) = llm.generate([whole[-64:]], SamplingParams(max_tokens=None, temperature=0.0))
    assert out.token_ids == free.token_ids[:1] and out.finish_reason == "length"
    cut = SamplingParams(max_tokens=8, temperature=0.0, truncate_prompt_tokens=-1, logprobs=1,
                         prompt_logprobs=1)  # fmt: skip
    (out,) = llm.generate([whole], cut)
    assert out.prompt_token_ids == whole[-64:] and out.token_ids == free.token_ids[:1]
    assert len(out.prompt_logprobs) == 64 and out.outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="prompt has 65 tokens, but max_model_len is 64"):
        llm.generate([whole[-65:]], GREEDY)
    assert llm.stats()["kv_blocks_used"] == 0
    server = AsyncLLM(llama_dir, dtype="float32", device="cpu", max_model_len=64, num_kv_blocks=8)
    with pytest.raises(ValueError, match="prompt has 64 tokens, but max_model_len is 64"):
        asyncio.run(server.generate([whole[-64:]], SamplingParams(max_tokens=None)))
    asyncio.run(server.shutdown())
