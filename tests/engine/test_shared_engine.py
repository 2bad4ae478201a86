"""AsyncLLMs sharing one engine process by name (a server's workers): the first starts it,
the others connect; each gets its own requests' outputs under its own ids, a front end that
goes does not disturb the others, and the process ends with the last of them."""

import asyncio
import collections
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from vllm_runner import AsyncLLM, SamplingParams
from vllm_runner.engine.engine_process import SharedEngine
from vllm_runner.llm import engine_args

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
KW = dict(dtype="float32", device="cpu", max_model_len=1024, cpu_kv_cache_gb=0.25)
PROMPTS = ["The capital of France is", "Write a poem about spring.", [1, 2, 3, 4, 5]]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))  # (a hang guard, not a timing)


def gone(pid: int) -> bool:
    """Exited and reaped (the AsyncLLM that started a shared engine reaps it: no zombie)."""
    return not os.path.exists(f"/proc/{pid}")


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.1)
    return False


def wait_gone(pid: int) -> None:
    for _ in range(600):
        if gone(pid):
            return
        time.sleep(0.1)
    pytest.fail(f"engine process {pid} still running")


@pytest.fixture
def name() -> str:
    return f"test-{uuid.uuid4().hex}"


def test_two_front_ends_share_one_engine(default_model_dir, smol_llm, name):
    first = AsyncLLM(default_model_dir, shared_engine=name, log_stats=True, **KW)
    second = AsyncLLM(default_model_dir, shared_engine=name, log_stats=True, **KW)
    try:
        assert first._client.process is not None and second._client.process is None
        assert second._client.pid == first._client.process.pid
        want = smol_llm.generate(PROMPTS, GREEDY)

        async def updates(llm):
            return [u async for u in llm.stream(PROMPTS[0], GREEDY, request_id="same")]

        # text built by the front end, and by the engine (stop strings), side by side
        stop = SamplingParams(max_tokens=24, temperature=0.0, stop=[" the"])
        (want_stop,) = smol_llm.generate(["Once upon a time"], stop)

        async def main():
            # the same request id from both at once: each front end's ids are its own
            return await asyncio.gather(
                updates(first),
                updates(second),
                first.generate(PROMPTS, GREEDY),
                second.generate(PROMPTS, GREEDY),
                second.generate(["Once upon a time"], stop),
            )

        a, b, got_first, got_second, (got_stop,) = run(main())
        assert got_stop.outputs == want_stop.outputs and got_stop.outputs[0].stop_reason == " the"
        for got in (got_first, got_second):
            assert [o.token_ids for o in got] == [o.token_ids for o in want]
            assert [o.text for o in got] == [o.text for o in want]
        for updates in (a, b):
            assert {u.request_id for u in updates} == {"same"}
            assert "".join(u.delta for u in updates) == want[0].text
        assert got_first[0].request_id != got_second[0].request_id  # (uuids of each)
        # both see the engine's stats once idle: every request's blocks freed (the engine's
        # idle flush reaches a front end after the other's last result: waited for)
        for llm in (first, second):
            for _ in range(300):
                if llm.stats()["kv_blocks_used"] == 0:
                    break
                time.sleep(0.1)
            assert llm.stats()["kv_blocks_used"] == 0
            assert llm.stats()["generation_tokens_total"] >= 8 * 12
    finally:
        run(second.shutdown())
        run(first.shutdown())
    wait_gone(first._client.process.pid)
    # its socket and key files went with it (the name's lock file stays)
    place = SharedEngine.named(name, engine_args(default_model_dir, None, dict(KW)))
    assert not os.path.exists(place.socket) and not place.key.exists()


def test_the_engine_outlives_the_front_end_that_started_it(default_model_dir, smol_llm, name):
    first = AsyncLLM(default_model_dir, shared_engine=name, **KW)
    second = AsyncLLM(default_model_dir, shared_engine=name, **KW)
    pid = first._client.process.pid
    want = smol_llm.generate(PROMPTS[:1], GREEDY)

    async def main():
        stream = second.stream(PROMPTS[0], GREEDY)
        head = await anext(stream)
        await first.shutdown()  # returns without waiting for the engine: second uses it
        rest = [u async for u in stream]
        return "".join(u.delta for u in [head, *rest]), await second.generate(PROMPTS[:1], GREEDY)

    text, again = run(main())
    assert text == want[0].text and again[0].token_ids == want[0].token_ids
    assert not gone(pid) and second.error is None
    # a third front end, after the first left, connects to the same engine
    third = AsyncLLM(default_model_dir, shared_engine=name, **KW)
    assert third._client.pid == pid
    run(third.shutdown())
    run(second.shutdown())
    wait_gone(pid)


def test_a_killed_front_end_leaves_the_others_served(default_model_dir, name):
    """A worker killed outright mid-stream: the engine aborts its requests (their blocks
    freed) and goes on serving the others."""
    llm = AsyncLLM(default_model_dir, shared_engine=name, **KW)
    script = textwrap.dedent(f"""
        import asyncio
        from vllm_runner import AsyncLLM, SamplingParams
        llm = AsyncLLM({default_model_dir!r}, shared_engine={name!r}, dtype="float32",
                       device="cpu", max_model_len=1024, cpu_kv_cache_gb=0.25)
        async def main():
            async for out in llm.stream("Once upon a time", SamplingParams(max_tokens=900,
                                        ignore_eos=True)):
                if out.num_token_ids == 3:
                    print("streaming", flush=True)
        asyncio.run(main())
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "streaming"
        assert llm.stats()["num_running"] == 1 or llm.stats()["kv_blocks_used"] > 0
        child.send_signal(signal.SIGKILL)
        child.wait()

        async def main():
            out = await llm.generate(["Hello"], GREEDY)
            for _ in range(100):  # the abort is applied between steps
                if llm.stats()["kv_blocks_used"] == 0:
                    break
                await llm.generate(["Hi"], SamplingParams(max_tokens=1))
            return out

        out = run(main())
        assert out[0].finished and llm.error is None
        assert llm.stats()["kv_blocks_used"] == 0 and llm.stats()["num_running"] == 0
    finally:
        child.kill()
        run(llm.shutdown())
    wait_gone(llm._client.process.pid)


def test_one_front_end_publishes_the_engines_stats(default_model_dir, name, monkeypatch):
    """Each front end counts its own requests; the engine's totals are published by one
    (the first ready, until it leaves), else a server's workers would count the same tokens
    once each."""
    seen: dict[int, list[bool]] = collections.defaultdict(list)
    deliver = AsyncLLM._deliver

    def spy(self, delivery):
        seen[id(self)].append(delivery.publish_stats)
        deliver(self, delivery)

    monkeypatch.setattr(AsyncLLM, "_deliver", spy)
    first = AsyncLLM(default_model_dir, shared_engine=name, log_stats=True, **KW)
    second = AsyncLLM(default_model_dir, shared_engine=name, log_stats=True, **KW)
    try:

        async def both():
            await asyncio.gather(first.generate(["Hi"], GREEDY), second.generate(["Hi"], GREEDY))

        run(both())
        # (a publisher's first delivery may be the unpublished hand-over of the totals)
        assert seen[id(first)][-1] and set(seen[id(first)][1:]) == {True}
        assert seen[id(second)] and set(seen[id(second)]) == {False}
        run(first.shutdown())
        seen[id(second)].clear()
        run(second.generate(["Hi"], GREEDY))
        # the oldest left: the next one publishes (after, maybe, the unpublished hand-over)
        assert seen[id(second)][-1] and set(seen[id(second)][1:]) == {True}
    finally:
        run(second.shutdown())
        run(first.shutdown())


def test_a_new_publisher_does_not_count_the_old_ones_tokens_again(default_model_dir, name):
    """The owner published 12 tokens; a front end that connected while the engine idled
    becomes the owner when it leaves: it counts on from what was published, not from
    nothing (found in review: it counted the engine's whole total again)."""
    first = AsyncLLM(default_model_dir, shared_engine=name, log_stats=True, **KW)
    try:
        run(first.generate(["Hi"], GREEDY))
        second = AsyncLLM(default_model_dir, shared_engine=name, log_stats=True, **KW)
        counter = second.metrics._counters["generation_tokens_total"]
        run(first.shutdown())
        before = counter._value.get()
        run(second.generate(["Hi"], GREEDY))
        assert second.stats()["generation_tokens_total"] == 24
        assert counter._value.get() - before == 12  # (was 24: the first's 12 again)
    finally:
        run(first.shutdown())
        run(second.shutdown())


def test_a_front_end_that_failed_to_start_does_not_keep_the_engine(
    default_model_dir, name, monkeypatch
):
    """A worker whose AsyncLLM fails after connecting (here: its tokenizer) and keeps the
    error (service.py: self.load_error) must not keep its connection: the engine would count
    it as a front end and outlive the last real one (found in review)."""
    import vllm_runner.async_llm as async_llm

    first = AsyncLLM(default_model_dir, shared_engine=name, **KW)
    pid = first._client.process.pid

    def broken(path):
        raise OSError("tokenizer unreadable")

    monkeypatch.setattr(async_llm, "load_tokenizer", broken)
    with pytest.raises(OSError) as failed:
        AsyncLLM(default_model_dir, shared_engine=name, **KW)
    run(first.shutdown())
    try:
        assert gone_within(pid, 15), "engine still running for a front end that never started"
    finally:
        del failed
        gc.collect()


def test_an_engine_that_fails_to_start_leaves_no_key_file(default_model_dir, name):
    """(found in review) block_size=7 passes the front end and fails in EngineCore, in the
    engine process: its key file must not stay behind."""
    kw = {**KW, "block_size": 7}
    place = SharedEngine.named(name, engine_args(default_model_dir, None, dict(kw)))
    with pytest.raises(ValueError, match="block_size"):
        AsyncLLM(default_model_dir, shared_engine=name, **kw)
    assert not place.key.exists(), "the failed engine's key file was left behind"


def test_a_front_end_still_loading_reads_what_the_engine_sends(
    default_model_dir, name, monkeypatch
):
    """(found in review) A worker that has connected but still loads its tokenizer reads
    nothing yet: the engine must send it nothing until it says it reads ("ready"). A stats
    delivery every STATS_INTERVAL_S to it filled its socket buffer in ~8 s, and the engine's
    blocking send then stalled every other front end until that worker had loaded."""
    import fcntl
    import struct
    import termios

    import vllm_runner.async_llm as async_llm

    first = AsyncLLM(default_model_dir, shared_engine=name, **KW)
    loading, release = threading.Event(), threading.Event()
    real_tokenizer, real_connect = async_llm.load_tokenizer, SharedEngine.connect
    conns = []

    def slow(path):
        loading.set()
        release.wait(120)  # a slow tokenizer (e.g. converted from sentencepiece)
        return real_tokenizer(path)

    def connect(self):
        found = real_connect(self)
        conns.append(found[0])
        return found

    monkeypatch.setattr(async_llm, "load_tokenizer", slow)
    monkeypatch.setattr(SharedEngine, "connect", connect)
    box = {}
    t = threading.Thread(
        target=lambda: box.setdefault("llm", AsyncLLM(default_model_dir, shared_engine=name, **KW))
    )
    t.start()
    try:
        assert loading.wait(60)
        asyncio.run(first.generate(["Hi"], SamplingParams(max_tokens=16, ignore_eos=True)))
        time.sleep(0.5)
        unread = struct.unpack("i", fcntl.ioctl(conns[0].fileno(), termios.FIONREAD, b"\0" * 4))
        assert unread[0] == 0, f"{unread[0]} bytes of deliveries left unread while loading"
    finally:
        release.set()
        t.join(60)
        if "llm" in box:
            asyncio.run(box["llm"].shutdown())
        asyncio.run(first.shutdown())


def test_a_shared_engine_needs_a_process(default_model_dir):
    with pytest.raises(ValueError, match="shared_engine='x' needs engine_process=True"):
        AsyncLLM(default_model_dir, shared_engine="x", engine_process=False, **KW)


def test_a_shared_engine_that_does_not_answer_fails_the_connection_in_time(name):
    """A stopped or stuck engine process still has its socket queue connections; the
    handshake would wait for ever: the front end gives up with a clear error."""
    from multiprocessing.connection import Listener

    place = SharedEngine.named(name, ("args",))
    key = place.new_key()
    listener = Listener(place.socket, "AF_UNIX", authkey=key)  # (never accepts)
    try:
        with pytest.raises(TimeoutError, match=r"did not answer in 0\.5 s"):
            place.connect(timeout=0.5)
    finally:
        listener.close()
        place.key.unlink()
    assert place.connect(timeout=5) is None  # none listens: start one


TINY = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
)  # fmt: skip


def test_one_relative_model_name_in_two_folders_is_two_engines(
    tmp_path, monkeypatch, name, peaked_llama
):
    """ "m" in two working directories names two models: the second front end does not attach
    to the first one's engine (it would get the other model's tokens, silently)."""
    from vllm_runner import LLM

    kw = dict(dtype="float32", device="cpu", max_model_len=256, cpu_kv_cache_gb=0.05)
    for folder, large in (("a", ("lm_head",)), ("b", ("embed",))):
        peaked_llama(str(tmp_path / folder / "m"), large, **TINY)
    monkeypatch.chdir(tmp_path / "a")
    first = AsyncLLM("m", shared_engine=name, **kw)
    monkeypatch.chdir(tmp_path / "b")
    second = AsyncLLM("m", shared_engine=name, **kw)
    try:
        want = LLM("m", **kw).generate([[1, 2, 3]], GREEDY)[0].token_ids
        got = run(second.generate([[1, 2, 3]], GREEDY))[0].token_ids
        assert second._client.pid != first._client.pid
        assert got == want
    finally:
        run(second.shutdown())
        run(first.shutdown())


def test_a_bad_handshake_does_not_stop_the_engine_accepting(
    tmp_path, name, monkeypatch, peaked_llama
):
    """A caller that answers the engine's challenge with a message too long for it fails
    alone: front ends that connect later still join."""
    import socket
    import struct

    path = peaked_llama(str(tmp_path / "m"), ("lm_head",), **TINY)
    kw = dict(dtype="float32", device="cpu", max_model_len=256, cpu_kv_cache_gb=0.05)
    first = AsyncLLM(path, shared_engine=name, **kw)
    try:
        place = SharedEngine.named(name, engine_args(path, None, dict(kw)))
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(place.socket)
            s.recv(1000)  # the challenge
            s.sendall(struct.pack("!i", 300) + b"x" * 300)
            time.sleep(0.5)
        monkeypatch.setattr(SharedEngine.connect, "__defaults__", (10.0,))
        second = AsyncLLM(path, shared_engine=name, **kw)
        assert second._client.pid == first._client.pid
        run(second.shutdown())
    finally:
        run(first.shutdown())
