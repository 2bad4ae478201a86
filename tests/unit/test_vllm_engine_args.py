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
