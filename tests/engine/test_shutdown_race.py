"""A request that another thread's shutdown() overtakes (after the request's checks, before
its command is sent) fails as shut down: it is not left waiting for a loop that has ended."""

import asyncio
import threading

import pytest

from vllm_runner import AsyncLLM, SamplingParams

KW = dict(dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "process"])
def test_a_request_overtaken_by_shutdown_fails_as_shut_down(llama_dir, engine_process):
    llm = AsyncLLM(llama_dir, engine_process=engine_process, **KW)
    send = llm._send_command

    def shut_down_first(command: tuple) -> None:
        if command[0] == "add":  # (another thread's shutdown, all of it, right now)
            other = threading.Thread(target=llm.shutdown)  # (a plain call: it waits)
            other.start()
            other.join()
        send(command)

    llm._send_command = shut_down_first

    async def main() -> None:
        with pytest.raises(RuntimeError, match="AsyncLLM is shut down"):
            async for _ in llm.stream([1, 2, 3], SamplingParams(max_tokens=4)):
                pass

    asyncio.run(asyncio.wait_for(main(), 60))  # (a hang guard)


def test_a_reason_the_loop_reports_after_shutdown_leaves_it_shut_down(llama_dir):
    """The loop's thread may report a failure while shutdown() runs (the race of a crash and
    a shutdown): once shut down, the engine stays "shut down" rather than taking the reason."""
    llm = AsyncLLM(llama_dir, engine_process=False, **KW)
    llm.shutdown()
    llm._loop_stopped("injected late failure")  # (as the loop's thread reports one)
    assert llm.error is None and llm.errored
    with pytest.raises(RuntimeError, match="AsyncLLM is shut down"):
        asyncio.run(llm.check_health())
