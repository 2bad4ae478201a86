"""vLLM scripts' engine arguments at the values this engine honours as they are: LLM and
AsyncLLM take them (they were refused as unknown) and generate as without them."""

import asyncio

from engine_testing import GREEDY, make_llm

from vllm_runner import AsyncLLM

VLLM_ARGS = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "disable_log_stats": True,
             "swap_space": 4}  # fmt: skip


def test_llm_and_async_llm_take_vllm_arguments_at_their_no_op_values(llama_dir):
    vllm_args = {**VLLM_ARGS, "tokenizer": llama_dir, "enable_chunked_prefill": True}
    want = make_llm(llama_dir).generate([[1, 2, 3]], GREEDY)[0].token_ids
    assert make_llm(llama_dir, **vllm_args).generate([[1, 2, 3]], GREEDY)[0].token_ids == want

    async def main():
        async with AsyncLLM(
            llama_dir, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05, **vllm_args
        ) as llm:
            return (await llm.generate([[1, 2, 3]], GREEDY))[0].token_ids

    assert asyncio.run(main()) == want
