"""Starting a shared engine when the front end that started one has gone while it loaded
(a worker killed, or Ctrl-C then a new server at once): one engine serves, not several."""

import asyncio
import fcntl
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

import vllm_runner
from vllm_runner import AsyncLLM

pytestmark = pytest.mark.timeout(300)  # (a hang guard, not a timing)

TINY = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
)  # fmt: skip
KW = dict(dtype="float32", device="cpu", max_model_len=256, cpu_kv_cache_gb=0.05)


def _until(done, what: str) -> None:
    event = threading.Event()
    for _ in range(2400):  # (polls; the test's timeout bounds the whole)
        if done():
            return
        event.wait(0.05)
    pytest.fail(f"never: {what}")


def _ended(pid: int) -> bool:
    """Exited (maybe a zombie: a grandchild whose parent was killed, reaped by init)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def _starter_script(model: str, name: str, marks: Path) -> str:
    """A front end whose engine process, spawned from this script, says it loads (its pid in
    ``loading``) and waits for ``go`` before it builds its engine."""
    return textwrap.dedent(f"""
        import os, threading
        from pathlib import Path
        import vllm_runner.engine.engine_process as ep

        real = ep.EngineCore

        class Held(real):
            def __init__(self, *args, **kwargs):
                Path({str(marks / "pid")!r}).write_text(str(os.getpid()))
                os.replace({str(marks / "pid")!r}, {str(marks / "loading")!r})
                while not os.path.exists({str(marks / "go")!r}):
                    threading.Event().wait(0.05)
                super().__init__(*args, **kwargs)

        ep.EngineCore = Held  # (in the spawned engine process too: it imports this file)

        if __name__ == "__main__":
            from vllm_runner import AsyncLLM
            AsyncLLM({model!r}, shared_engine={name!r}, **{KW!r})
    """)


def test_a_starter_killed_while_its_engine_loads_leaves_one_engine(
    tmp_path, peaked_llama, monkeypatch
):
    """The starter is killed while its engine loads; the next front end waits for that
    engine and then starts its own, and later ones connect to it. (Found in review: the
    next one started a second engine beside the loading one, whose socket the first then
    replaced and removed as it ended: every later front end started yet another engine.)"""
    model = peaked_llama(str(tmp_path / "m"), ("lm_head",), **TINY)
    name, marks = f"test-{uuid.uuid4().hex}", tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "starter.py"
    script.write_text(_starter_script(model, name, marks))
    # (this checkout's vllm_runner in the script's process and its engine's)
    env = {**os.environ, "PYTHONPATH": str(Path(vllm_runner.__file__).parents[1])}
    starter = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        _until(lambda: (marks / "loading").exists(), "the first engine loads")
        first_engine = int((marks / "loading").read_text())
    finally:
        starter.kill()
        starter.wait()

    # The next front end: once it has started an engine, or waits for the lock to do so,
    # the first engine goes on loading.
    waiting, flock = threading.Event(), fcntl.flock

    def watched_flock(f, operation):
        if operation == fcntl.LOCK_EX:
            try:
                return flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waiting.set()
        return flock(f, operation)

    monkeypatch.setattr(fcntl, "flock", watched_flock)
    box: dict = {}
    thread = threading.Thread(
        target=lambda: box.setdefault("llm", AsyncLLM(model, shared_engine=name, **KW))
    )
    thread.start()
    _until(lambda: waiting.is_set() or "llm" in box, "the next front end waits or starts")
    (marks / "go").touch()
    thread.join(240)
    second = box["llm"]
    try:
        _until(lambda: _ended(first_engine), "the first engine ends (its starter is gone)")
        assert second._client.pid != first_engine
        third = AsyncLLM(model, shared_engine=name, **KW)
        try:
            assert third._client.pid == second._client.pid, "a third engine was started"
        finally:
            asyncio.run(third.shutdown())
    finally:
        asyncio.run(second.shutdown())
