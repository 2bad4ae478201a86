"""An AsyncLLM dropped without shutdown() (``del llm``, or a function's local going out of
scope) releases its engine, as vLLM's does: the loop thread ends, or the engine process
is told to exit and is reaped; of a shared engine, only this front end goes."""

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
import uuid
import weakref

import pytest

from vllm_runner import AsyncLLM, SamplingParams

pytestmark = pytest.mark.timeout(300)  # (a hang guard, not a timing)

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
KW = dict(dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def _until(done, what: str) -> None:
    event = threading.Event()
    for _ in range(600):  # (polls; the test's timeout bounds the whole)
        gc.collect()
        if done():
            return
        event.wait(0.05)
    pytest.fail(f"never: {what}")


def _gone(pid: int) -> bool:
    """Exited and reaped (no zombie left)."""
    return not os.path.exists(f"/proc/{pid}")


def test_a_dropped_async_llm_ends_its_engine_thread(llama_dir):
    llm = AsyncLLM(llama_dir, engine_process=False, **KW)
    assert run(llm.generate([[1, 2, 3]], GREEDY))[0].finished
    thread, engine = llm._thread, weakref.ref(llm.engine)
    del llm
    gc.collect()
    _until(lambda: not thread.is_alive(), "the engine loop thread ended")
    _until(lambda: engine() is None, "the engine was freed")


def test_a_function_local_async_llm_ends_its_engine_thread(llama_dir):
    def use() -> threading.Thread:
        llm = AsyncLLM(llama_dir, engine_process=False, **KW)

        async def first_token():
            async for _ in llm.stream([1, 2, 3], GREEDY):
                return

        run(first_token())
        return llm._thread

    thread = use()
    _until(lambda: not thread.is_alive(), "the engine loop thread ended")


def test_a_dropped_async_llm_ends_its_engine_process(llama_dir):
    llm = AsyncLLM(llama_dir, engine_process=True, **KW)
    assert run(llm.generate([[1, 2, 3]], GREEDY))[0].finished
    pid, reader = llm._client.process.pid, llm._thread
    del llm
    gc.collect()
    _until(lambda: not reader.is_alive(), "the results reader thread ended")
    _until(lambda: _gone(pid), f"the engine process {pid} exited and was reaped")


def test_a_dropped_front_end_of_a_shared_engine_leaves_it_to_the_others(llama_dir):
    name = f"test-{uuid.uuid4().hex}"
    first = AsyncLLM(llama_dir, shared_engine=name, **KW)
    second = AsyncLLM(llama_dir, shared_engine=name, **KW)
    pid, reader = first._client.process.pid, second._thread
    assert second._client.pid == pid
    del second
    gc.collect()
    _until(lambda: not reader.is_alive(), "the dropped front end's reader thread ended")
    assert run(first.generate([[1, 2, 3]], GREEDY))[0].finished  # the engine serves on
    assert not _gone(pid) and first.error is None
    third = AsyncLLM(llama_dir, shared_engine=name, **KW)  # (connects to the same one)
    assert third._client.pid == pid
    del first  # the starter goes: the engine is the third's still
    gc.collect()
    assert run(third.generate([[4, 5, 6]], GREEDY))[0].finished
    reader = third._thread
    del third  # the last: the engine ends, and its starter's reaper reaps it
    _until(lambda: not reader.is_alive(), "the last front end's reader thread ended")
    _until(lambda: _gone(pid), f"the shared engine process {pid} exited and was reaped")


def test_async_llms_left_unshut_at_exit_end_quietly(llama_dir):
    """At interpreter exit (no shutdown, one of each kind still referenced, one dropped):
    exit code 0 and nothing printed by a finalizer."""
    script = textwrap.dedent(f"""
        from vllm_runner import AsyncLLM
        kw = dict(dtype="float32", device="cpu", cpu_kv_cache_gb=0.05)
        if __name__ == "__main__":
            in_thread = AsyncLLM({llama_dir!r}, engine_process=False, **kw)
            apart = AsyncLLM({llama_dir!r}, engine_process=True, **kw)
            dropped = AsyncLLM({llama_dir!r}, engine_process=True, **kw)
            del dropped
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
