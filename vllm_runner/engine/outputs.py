"""Dataclasses exchanged between scheduler, model runner and the front ends."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vllm_runner.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """First scheduling of a request (or its resumption after preemption)."""

    request_id: str
    token_ids: list[int]  # every known token (prompt + outputs so far)
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    seed: int | None


@dataclass
class CachedRequestData:
    """A request the runner already holds: its new blocks and progress."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # request id -> tokens to compute this step
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]  # finished or preempted since the last step: drop their state

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    """Per sampled request: its new token, and logprobs when asked for."""

    sampled: dict[str, int]  # request id -> sampled token id
    # request id -> (sampled token's logprob, {token id: logprob} of the top-N)
    logprobs: dict[str, tuple[float, dict[int, float]]] = field(default_factory=dict)
    # request id -> per prompt position (the first None): {token id: logprob} of the prompt
    # token given its prefix and of the top ``prompt_logprobs`` tokens
    prompt_logprobs: dict[str, list[dict[int, float] | None]] = field(default_factory=dict)


@dataclass
class EngineStepOutput:
    """What the scheduler reports after a step for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None
    new_sampled_logprobs: list[float] | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0


# ---- what users get ----------------------------------------------------------------------------
@dataclass
class CompletionOutput:
    """One of a request's ``n`` completions."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def __str__(self) -> str:
        return self.text


@dataclass
class RequestOutput:
    """A finished (or in-progress) request; the top-level fields are the first completion's."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # per prompt position (the first None): {token id: logprob} of the prompt token given
    # its prefix and of the ``prompt_logprobs`` most likely tokens there (as vLLM)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    def __str__(self) -> str:
        return self.text


@dataclass
class StreamOutput:
    """One streamed update of one completion: ``delta`` is the text new since the last one."""

    request_id: str
    index: int
    delta: str
    text: str
    num_token_ids: int  # generated so far (the ids: new_token_ids of each update, joined)
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None
    finished: bool
    finish_reason: str | None
    prompt_token_ids: list[int]
    stop_reason: int | str | None = None
    error: str | None = None

    def __str__(self) -> str:
        return self.delta

    def merge(self, later: StreamOutput) -> StreamOutput | None:
        """This update followed by ``later`` of the same completion as one update, or None
        when they cannot be one (another completion, an error, or this one finished)."""
        if (
            later.request_id != self.request_id
            or later.index != self.index
            or self.finished
            or self.error is not None
            or later.error is not None
        ):
            return None
        logprobs = None
        if self.new_logprobs is not None or later.new_logprobs is not None:
            logprobs = (self.new_logprobs or []) + (later.new_logprobs or [])
        return dataclasses.replace(
            later,
            delta=self.delta + later.delta,
            new_token_ids=self.new_token_ids + later.new_token_ids,
            new_logprobs=logprobs,
        )
