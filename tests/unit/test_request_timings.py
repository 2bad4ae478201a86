"""The latencies a request reports come from the times its outputs arrived: time to first
token from the first step's output (not a later one), inter-token gaps per completion."""

import vllm_runner.engine.output_processor as op
import vllm_runner.engine.serving_loop as loop
from vllm_runner.engine.outputs import EngineStepOutput
from vllm_runner.sampling_params import SamplingParams


def _clock(monkeypatch, times: list[float]) -> None:
    """``time.monotonic`` (the module both files import) returns these, one per call."""
    ticks = iter(times)
    monkeypatch.setattr(op.time, "monotonic", lambda: next(ticks))


def test_time_to_first_token_is_the_first_outputs_time(monkeypatch) -> None:
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    state = op.new_request_state("r", None, [1, 2, 3], params, None, "e0")
    state.arrival_time = 100.0
    _clock(monkeypatch, [102.5, 103.0, 104.5])
    for token in (7, 8, 9):
        op.apply_step_output(state, 0, EngineStepOutput("e0", [token], None, None, None))
    assert state.first_token_time == 102.5  # the first output's, kept through later steps
    assert state.completions[0].token_times == [102.5, 103.0, 104.5]
    monkeypatch.setattr(loop.time, "monotonic", lambda: 105.0)
    timings = loop.request_timings(state)
    assert timings.ttft_s == 2.5
    assert timings.itl_s == [0.5, 1.5]
    assert timings.e2e_s == 5.0
    assert timings.finish_reasons == ["abort"]  # (no finish came: reported as aborted)


def test_inter_token_gaps_stay_within_each_completion(monkeypatch) -> None:
    """n = 2: the gaps are each completion's own, never one completion's token to the
    other's."""
    params = SamplingParams(n=2, max_tokens=2, ignore_eos=True)
    state = op.new_request_state("r", None, [1], params, None, "e1")
    state.arrival_time = 0.0
    _clock(monkeypatch, [1.0, 1.25, 2.0, 3.0])
    for index, token in ((0, 5), (1, 6), (0, 7), (1, 8)):
        out = EngineStepOutput(state.child_ids[index], [token], None, None, None)
        op.apply_step_output(state, index, out)
    monkeypatch.setattr(loop.time, "monotonic", lambda: 4.0)
    timings = loop.request_timings(state)
    assert timings.ttft_s == 1.0
    assert timings.itl_s == [1.0, 1.75]
