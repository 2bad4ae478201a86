"""vLLM engine arguments that scripts pass at values this engine honours as they are
(one device, no stats log, ...): taken; other values are refused naming the value and the
limit (they were all refused as unknown arguments)."""

import pytest

from vllm_runner.config import EngineArgs


def test_one_device_parallelism_is_taken_and_more_is_refused():
    EngineArgs(tensor_parallel_size=1, pipeline_parallel_size=1).validate()
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        with pytest.raises(ValueError, match=rf"{name} must be 1 \(.*one device.*\), got 2"):
            EngineArgs(**{name: 2}).validate()
        with pytest.raises(ValueError, match=f"{name} must be an integer, got '1'"):
            EngineArgs(**{name: "1"}).validate()


def test_no_stats_log_and_an_unused_swap_space_are_taken():
    """vLLM's LLM default (disable_log_stats=True) and its CPU swap space (this engine
    recomputes a preempted request: nothing is swapped) are taken; a stats log is refused."""
    EngineArgs(disable_log_stats=True, swap_space=4).validate()
    EngineArgs(swap_space=0.5).validate()
    with pytest.raises(ValueError, match=r"disable_log_stats must be True \(.*, got False"):
        EngineArgs(disable_log_stats=False).validate()
    with pytest.raises(ValueError, match="disable_log_stats must be true or false, got 'yes'"):
        EngineArgs(disable_log_stats="yes").validate()
    with pytest.raises(ValueError, match="swap_space must be >= 0, got -1"):
        EngineArgs(swap_space=-1).validate()
    with pytest.raises(ValueError, match="swap_space must be a number, got '4'"):
        EngineArgs(swap_space="4").validate()


def test_the_model_as_its_own_tokenizer_is_taken_and_another_is_refused(tmp_path):
    """vLLM scripts often name the model twice; the engine loads the model folder's tokenizer,
    so another one is refused, not silently replaced by it."""
    model = str(tmp_path)
    for same in (None, model, model + "/"):
        EngineArgs(model=model, tokenizer=same).validate()
    with pytest.raises(ValueError, match=r"tokenizer must be None or the model \(.*, got .other."):
        EngineArgs(model=model, tokenizer="other").validate()


def test_chunked_prefill_is_taken_on_and_refused_off():
    """This engine always chunks a long prompt to the step budget (vLLM v1's default)."""
    for on in (None, True):
        EngineArgs(enable_chunked_prefill=on).validate()
    with pytest.raises(ValueError, match=r"enable_chunked_prefill must be True \(.*, got False"):
        EngineArgs(enable_chunked_prefill=False).validate()
