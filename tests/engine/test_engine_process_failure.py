"""The engine process's own loop fails (a CUDA error in a step, a bug): every front end's
open streams and later requests fail naming the cause, not only "the engine process
exited (code 1)" with the cause left in the engine process's stderr. So for a loop in a
thread, and for a front end whose results the engine process cannot send."""

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from multiprocessing import Pipe
from pathlib import Path

import pytest

import vllm_runner
from vllm_runner import AsyncLLM, EngineDeadError, SamplingParams
from vllm_runner.engine.engine_client import EngineClient, EngineFailed
from vllm_runner.engine.front_ends import STATS_INTERVAL_S, FrontEnds
from vllm_runner.engine.serving_loop import Delivery

pytestmark = pytest.mark.timeout(300)  # (a hang guard, not a timing)

CAUSE = "RuntimeError: CUDA error: an illegal memory access was encountered (injected)"


def _script(model: str, mark: Path, shared: str | None) -> str:
    """Front ends (two of a shared engine) whose engine process, spawned from this script,
    fails in its step once ``mark`` exists; each prints what its stream and a later request
    raised."""
    return textwrap.dedent(f"""
        import asyncio, os
        import vllm_runner.engine.engine_process as ep
        from vllm_runner import AsyncLLM, SamplingParams

        class Failing(ep.EngineCore):
            def step(self, *args, **kwargs):
                if os.path.exists({str(mark)!r}):
                    raise RuntimeError(
                        "CUDA error: an illegal memory access was encountered (injected)"
                    )
                return super().step(*args, **kwargs)

        ep.EngineCore = Failing  # (in the spawned engine process too: it imports this file)

        async def use(i, llm, started):
            params = SamplingParams(max_tokens=400, ignore_eos=True)
            try:
                async for _ in llm.stream([1, 2, 3, 4], params):
                    started.set()
                print(i, "stream ended")
            except Exception as e:
                print(i, "stream:", type(e).__name__, e)
            started.set()  # (also if it never started)
            try:
                await llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
                print(i, "later: served")
            except Exception as e:
                print(i, "later:", type(e).__name__, e)
            print(i, "error:", llm.error)

        async def main(llms):
            started = [asyncio.Event() for _ in llms]
            tasks = [asyncio.create_task(use(i, llm, started[i])) for i, llm in enumerate(llms)]
            for s in started:
                await s.wait()
            open({str(mark)!r}, "w").close()
            await asyncio.gather(*tasks)

        if __name__ == "__main__":
            kw = dict(dtype="float32", device="cpu", max_model_len=512, cpu_kv_cache_gb=0.05)
            n = {1 if shared is None else 2}
            llms = [AsyncLLM({model!r}, engine_process=True, shared_engine={shared!r}, **kw)
                    for _ in range(n)]
            asyncio.run(asyncio.wait_for(main(llms), 120))
            llms[0]._client.wait(30)
            print("exit code:", llms[0]._client.process.exitcode)
    """)


@pytest.mark.parametrize("shared", [False, True], ids=["apart", "shared"])
def test_a_failed_engine_loop_names_its_cause_to_every_front_end(llama_dir, tmp_path, shared):
    script = tmp_path / "server.py"
    name = f"test-{uuid.uuid4().hex}" if shared else None
    script.write_text(_script(llama_dir, tmp_path / "fail", name))
    # (this checkout's vllm_runner in the script's process and its engine's)
    env = {**os.environ, "PYTHONPATH": str(Path(vllm_runner.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # (where: the frame that raised it, in the script's engine class)
    reason = f"the engine process failed: {CAUSE} (raised in step, server.py:"
    for i in range(2 if shared else 1):
        for what in ("stream: EngineDeadError ", "later: EngineDeadError ", "error: "):
            assert any(line.startswith(f"{i} {what}{reason}") for line in lines), done.stdout
    assert "exit code: 1" in lines, done.stdout  # (it still exits non-zero)
    assert "Traceback" in done.stderr and CAUSE in done.stderr  # (and prints its traceback)


def test_a_failed_loop_thread_names_its_cause_as_an_engine_process_does(llama_dir):
    """Without an engine process the wording was another ("the engine loop failed:
    RuntimeError('...')", with no place): the same cause, the same form."""
    kw = dict(dtype="float32", device="cpu", max_model_len=512, cpu_kv_cache_gb=0.05)
    llm = AsyncLLM(llama_dir, engine_process=False, **kw)
    schedule, armed = llm.engine.scheduler.schedule, threading.Event()

    def failing():
        if armed.is_set():
            raise RuntimeError("injected")
        return schedule()

    llm.engine.scheduler.schedule = failing
    line = failing.__code__.co_firstlineno + 2
    where = f"(raised in failing, {Path(__file__).name}:{line})"
    reason = f"the engine loop failed: RuntimeError: injected {where}"

    async def main():
        with pytest.raises(EngineDeadError) as streamed:
            async for _ in llm.stream([1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True)):
                armed.set()
        with pytest.raises(EngineDeadError) as later:
            await llm.generate([[4, 5]], SamplingParams(max_tokens=2))
        with pytest.raises(EngineDeadError) as health:
            await llm.check_health()
        return [str(e.value) for e in (streamed, later, health)]

    assert asyncio.run(asyncio.wait_for(main(), 60)) == [reason] * 3  # (a hang guard)
    assert llm.error == reason and llm.errored
    llm.shutdown()


def test_a_front_end_whose_results_do_not_pickle_is_told_why():
    """The engine process could not pickle a front end's results (a bug): the front end was
    dropped, and told it "read too few of its results (was its process stopped?)" or that
    the engine "exited (code 0)"; it is told the cause, and its requests are aborted."""
    commands_r, commands_w = Pipe(duplex=False)
    results_r, results_w = Pipe(duplex=False)
    hello = ("ready", None, {"generation_tokens_total": 0}, "m", os.getpid())
    front_ends = FrontEnds(commands_r, results_w, hello, None)
    commands_w.send(("ready", False))
    commands_w.send(("add", "r", 5, b"request"))
    assert front_ends.receive(True) == ("add", "0:r", (0, 5), b"request")
    front_ends.emit(Delivery([((0, 5), lambda: 0)], {"generation_tokens_total": 1}))
    time.sleep(STATS_INTERVAL_S)
    front_ends.emit(Delivery([], {"generation_tokens_total": 2}))  # (the next step's stats)
    client = EngineClient()
    client.pid = os.getpid()  # (alive: a shared engine that goes on for the others)
    client._connections = (None, results_r)
    assert results_r.poll(10), "its reader waits for ever"  # (a hang guard)
    with pytest.raises((EngineFailed, EOFError)) as ended:
        client.read(lambda delivery: None)
    reason = client.stopped_because(ended.value)
    assert reason.startswith("the engine process failed to send this front end's results: ")
    assert "pickle" in reason, reason
    assert [front_ends.receive(False) for _ in range(2)] == [("abort", "0:r"), ("stop",)]


def test_the_command_sender_ends_with_the_results():
    """The engine process failed (or was killed): the thread that sends its commands ended
    only when the AsyncLLM was collected (shutdown() left it waiting)."""
    commands_r, commands_w = Pipe(duplex=False)
    results_r, results_w = Pipe(duplex=False)
    client = EngineClient()
    before = set(threading.enumerate())
    client._attach(commands_w, results_r)
    (sender,) = set(threading.enumerate()) - before
    results_w.send("the engine process failed: RuntimeError: injected")
    with pytest.raises(EngineFailed) as failed:
        client.read(lambda delivery: None)
    assert client.stopped_because(failed.value).endswith("RuntimeError: injected")
    sender.join(10)
    assert not sender.is_alive()
