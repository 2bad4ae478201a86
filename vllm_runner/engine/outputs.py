"""Dataclasses exchanged between scheduler, model runner and the front ends."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vllm_runner.lora.request import LoRARequest
from vllm_runner.pooling_params import PoolingParams
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
    pooling: PoolingParams | None = None  # an embedding request: pooled, never sampled
    lora_request: LoRARequest | None = None  # the adapter it runs with


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
    """Per sampled request: its new token, and logprobs when asked for; per embedding
    request whose last prompt chunk ran: its pooled vector."""

    sampled: dict[str, int]  # request id -> sampled token id
    # request id -> (sampled token's logprob, {token id: logprob} of the top-N)
    logprobs: dict[str, tuple[float, dict[int, float]]] = field(default_factory=dict)
    # request id -> per prompt position (the first None): {token id: logprob} of the prompt
    # token given its prefix and of the top ``prompt_logprobs`` tokens
    prompt_logprobs: dict[str, list[dict[int, float] | None]] = field(default_factory=dict)
    # request id -> per prompt position (the first None): the prompt token's rank there
    # among the vocabulary (1: the most likely), handed over with ``prompt_logprobs``
    prompt_ranks: dict[str, list[int | None]] = field(default_factory=dict)
    pooled: dict[str, list[float]] = field(default_factory=dict)  # request id -> vector


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
    prompt_ranks: list[int | None] | None = None  # (with prompt_logprobs)
    embedding: list[float] | None = None  # an embedding request's vector (it has ended)


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

    def finished(self) -> bool:
        """As vLLM's: whether this completion has ended (its finish_reason is set)."""
        return self.finish_reason is not None

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
class EmbeddingOutput:
    """As vLLM's: one prompt's embedding."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """As vLLM's (``LLM.embed``'s outputs): ``outputs.embedding`` is the prompt's vector."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool
    num_cached_tokens: int = 0


# the last item of a request's stream inside the engine's front ends
FinalOutput = RequestOutput | EmbeddingRequestOutput


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
    # on a completion's first update, when asked: RequestOutput.prompt_logprobs, and the
    # prompt tokens' ranks (ModelRunnerOutput.prompt_ranks)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_ranks: list[int | None] | None = None

    def __str__(self) -> str:
        return self.delta

    def continues_with(self, later: StreamOutput) -> bool:
        """Whether ``later`` can join this update (same completion, no error, not finished)."""
        return (
            later.request_id == self.request_id
            and later.index == self.index
            and not self.finished
            and self.error is None
            and later.error is None
        )


def merge_updates(items: list) -> list:
    """``items`` (stream updates, final outputs, errors) with each run of updates that
    continue one another joined into one update; everything else kept, in order. Linear in
    the items (a consumer far behind may have thousands waiting)."""
    merged: list = []
    run: list[StreamOutput] = []

    def close_run() -> None:
        if len(run) == 1:
            merged.append(run[0])
        elif run:
            last = run[-1]
            logprobs = None
            if any(u.new_logprobs is not None for u in run):
                logprobs = [lp for u in run for lp in (u.new_logprobs or [])]
            merged.append(
                dataclasses.replace(
                    last,
                    delta="".join(u.delta for u in run),
                    new_token_ids=[t for u in run for t in u.new_token_ids],
                    new_logprobs=logprobs,
                    prompt_logprobs=next(
                        (u.prompt_logprobs for u in run if u.prompt_logprobs is not None), None
                    ),
                    prompt_ranks=next(
                        (u.prompt_ranks for u in run if u.prompt_ranks is not None), None
                    ),
                )
            )
        run.clear()

    for item in items:
        if isinstance(item, StreamOutput) and (not run or run[-1].continues_with(item)):
            run.append(item)
            continue
        close_run()
        if isinstance(item, StreamOutput):
            run.append(item)
        else:
            merged.append(item)
    close_run()
    return merged
