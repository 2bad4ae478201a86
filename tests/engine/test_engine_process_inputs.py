"""What a front end sends its engine process is read there one request at a time: a request
the engine process cannot load fails alone, and the engine serves everyone else on."""

import asyncio
import os
import signal
import sys
import threading
import types

import pytest

from vllm_runner import AsyncLLM, SamplingParams
from vllm_runner.async_llm import RequestError

KW = dict(dtype="float32", device="cpu", max_model_len=256, cpu_kv_cache_gb=0.05)


@pytest.fixture
def only_here(monkeypatch):
    """Subclasses of list and str whose module exists in this process only (as classes
    defined in a notebook, or under `python -c`): they pickle here, and fail to load in the
    engine's process."""
    module = types.ModuleType("vllm_runner_test_only_here")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    made = []
    for base in (list, str):
        cls = type(f"My{base.__name__}", (base,), {"__module__": module.__name__})
        setattr(module, cls.__name__, cls)
        made.append(cls)
    return made


def test_a_request_the_engine_process_cannot_load_fails_alone(llama_dir, only_here):
    ids, text = only_here
    llm = AsyncLLM(llama_dir, engine_process=True, **KW)
    params = SamplingParams(max_tokens=8, ignore_eos=True)

    async def other() -> str:
        return [o async for o in llm.stream([1, 2, 3], params)][-1].finish_reason

    async def unloadable() -> None:
        await asyncio.sleep(0)  # (while the other runs)
        with pytest.raises(RequestError, match="the engine process could not load"):
            async for _ in llm.stream(ids([4, 5, 6]), params):
                pass

    async def main():
        try:
            reason, _ = await asyncio.gather(other(), unloadable())
            # (a request id of such a class is sent as a plain string, as is its abort)
            outs = [o async for o in llm.stream([7, 8], params, request_id=text("mine"))]
            await llm.abort(text("mine"))
            again = await llm.generate([[9, 10]], params)
            return reason, outs[-1], again[0]
        finally:
            await llm.shutdown()

    reason, last, again = asyncio.run(asyncio.wait_for(main(), 120))  # (a hang guard)
    assert reason == "length" and llm.error is None
    assert last.request_id == "mine" and last.finish_reason == "length"
    assert again.finished


def test_a_long_command_is_sent_without_waiting_for_the_engine(llama_dir):
    """A command larger than the pipe's buffer (a long prompt) goes out through a sender
    thread: the caller (a server's event loop) never waits for the engine process to read
    it, which it does between steps (here: not at all, the process is stopped)."""
    llm = AsyncLLM(llama_dir, engine_process=True, **KW)
    pid = llm._client.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        command = ("abort", "x" * (1 << 20))
        caller = threading.Thread(target=llm._client.send, args=(command,), daemon=True)
        caller.start()
        caller.join(30)  # (a hang guard: it returned at once, or waits for the engine)
        waited = caller.is_alive()
    finally:
        os.kill(pid, signal.SIGCONT)
    out = asyncio.run(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True)))
    llm.shutdown()
    assert not waited and out[0].finished and llm.error is None
