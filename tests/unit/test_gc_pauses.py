"""Full garbage collections wait while engines run requests, young ones come less often, and
the thresholds come back when all idle."""

import gc

import pytest

from vllm_runner.engine import gc_pauses
from vllm_runner.engine.gc_pauses import FullCollections


@pytest.fixture
def thresholds():
    assert FullCollections._busy == 0, "an engine of an earlier test stayed busy"
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*saved)


def test_busy_defers_full_collections_until_the_last_engine_idles(thresholds):
    a, b = FullCollections(), FullCollections()
    a.busy()
    assert gc.get_threshold() == (gc_pauses.BUSY_YOUNG, 10, gc_pauses._NEVER)
    b.busy()
    b.busy()  # a second step of the same engine counts once
    a.idle()
    assert gc.get_threshold() == (gc_pauses.BUSY_YOUNG, 10, gc_pauses._NEVER)  # b still runs
    b.idle()
    assert gc.get_threshold() == (700, 10, 10)
    b.idle()  # idle twice: nothing to undo
    assert gc.get_threshold() == (700, 10, 10) and FullCollections._busy == 0


def test_a_threshold_set_meanwhile_is_kept(thresholds):
    a = FullCollections()
    a.busy()
    gc.set_threshold(500, 10, 50)
    a.idle()
    assert gc.get_threshold() == (500, 10, 50)


def test_a_young_threshold_set_meanwhile_is_kept(thresholds):
    a = FullCollections()
    a.busy()
    gc.set_threshold(300)  # the youngest alone
    a.idle()
    assert gc.get_threshold() == (300, 10, 10)


def test_young_collections_left_off_stay_off(thresholds):
    gc.set_threshold(0, 10, 10)  # 0: no automatic collections
    a = FullCollections()
    a.busy()
    assert gc.get_threshold() == (0, 10, gc_pauses._NEVER)
    a.idle()
    assert gc.get_threshold() == (0, 10, 10)


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
    assert seen and all(t == (gc_pauses.BUSY_YOUNG, 10, gc_pauses._NEVER) for t in seen)
    assert gc.get_threshold() == (700, 10, 10)


def test_abort_of_the_last_request_goes_idle(tiny_model_dirs, thresholds):
    from vllm_runner import LLM, SamplingParams

    llm = LLM(tiny_model_dirs["llama"], dtype="float32", device="cpu", max_model_len=64)
    state = llm.engine.add_request([1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True))
    llm.engine.step()
    assert gc.get_threshold()[2] == gc_pauses._NEVER
    llm.engine.abort(state.request_id)
    assert not llm.engine.has_unfinished() and gc.get_threshold() == (700, 10, 10)


def test_interrupted_generate_leaves_nothing_running(tiny_model_dirs, thresholds, monkeypatch):
    """A generate call interrupted mid-run (Ctrl-C) aborts its requests: the next call runs
    only its own, and full collections are back."""
    from vllm_runner import LLM, SamplingParams

    llm = LLM(tiny_model_dirs["llama"], dtype="float32", device="cpu", max_model_len=64)
    step = llm.engine.step
    calls = []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "step", interrupted_step)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3], [4, 5]], params)
    assert not llm.engine.has_unfinished() and gc.get_threshold() == (700, 10, 10)
    out = llm.generate([[6, 7]], params)
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 8


def test_a_young_threshold_above_the_busy_one_is_kept_while_busy(thresholds):
    gc.set_threshold(50_000, 10, 10)
    a = FullCollections()
    a.busy()
    assert gc.get_threshold() == (50_000, 10, gc_pauses._NEVER)
    a.idle()
    assert gc.get_threshold() == (50_000, 10, 10)


def test_startup_objects_are_frozen_once(monkeypatch):
    """Collected first (garbage is not frozen), frozen, and unfrozen at exit; only once."""
    calls = []
    monkeypatch.setattr(gc_pauses.gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc_pauses.gc, "collect", lambda *a: calls.append("collect") or 0)
    register = gc_pauses.atexit.register  # (others, e.g. triton's at its first import, kept)
    monkeypatch.setattr(
        gc_pauses.atexit,
        "register",
        lambda f: calls.append("unfreeze at exit") if f is gc.unfreeze else register(f),
    )
    monkeypatch.setattr(gc_pauses.freeze_startup_objects, "done", False, raising=False)
    gc_pauses.freeze_startup_objects()
    gc_pauses.freeze_startup_objects()
    assert calls == ["collect", "freeze", "unfreeze at exit"]


def test_the_middle_threshold_is_left_as_it_is(thresholds):
    gc.set_threshold(700, 25, 10)
    a = FullCollections()
    a.busy()
    assert gc.get_threshold() == (gc_pauses.BUSY_YOUNG, 25, gc_pauses._NEVER)
    a.idle()
    assert gc.get_threshold() == (700, 25, 10)
