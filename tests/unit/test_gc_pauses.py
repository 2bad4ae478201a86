"""Full garbage collections wait while engines run requests, and come back when all idle."""

import gc

import pytest

from vllm_runner.engine import gc_pauses
from vllm_runner.engine.gc_pauses import FullCollections


@pytest.fixture
def thresholds():
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*saved)


def test_busy_defers_full_collections_until_the_last_engine_idles(thresholds):
    a, b = FullCollections(), FullCollections()
    a.busy()
    assert gc.get_threshold() == (700, 10, gc_pauses._NEVER)
    b.busy()
    b.busy()  # a second step of the same engine counts once
    a.idle()
    assert gc.get_threshold() == (700, 10, gc_pauses._NEVER)  # b still runs
    b.idle()
    assert gc.get_threshold() == (700, 10, 10)
    b.idle()  # idle twice: nothing to undo
    assert gc.get_threshold() == (700, 10, 10) and FullCollections._busy == 0


def test_long_busy_stretch_still_collects_fully(thresholds, monkeypatch):
    calls = []
    monkeypatch.setattr(gc_pauses.gc, "collect", lambda *a: calls.append(a) or 0)
    monkeypatch.setattr(gc_pauses, "FULL_EVERY_STEPS", 3)
    c = FullCollections()
    for _ in range(7):
        c.busy()
    c.idle()
    assert calls == [(), ()]  # steps 3 and 6: full passes


def test_engine_steps_defer_and_restore(tiny_model_dirs, thresholds):
    """During ``generate`` every step runs with full collections deferred; afterwards the
    process's thresholds are back."""
    from vllm_runner import LLM, SamplingParams

    llm = LLM(tiny_model_dirs["llama"], dtype="float32", device="cpu", max_model_len=64)
    seen = []
    launch = llm.engine.runner.launch

    def recording_launch(*args, **kwargs):
        seen.append(gc.get_threshold())
        return launch(*args, **kwargs)

    llm.engine.runner.launch = recording_launch
    out = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]
    assert seen and all(t == (700, 10, gc_pauses._NEVER) for t in seen)
    assert gc.get_threshold() == (700, 10, 10)
