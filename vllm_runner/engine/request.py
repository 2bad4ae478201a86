"""A request as the scheduler sees it: tokens known vs tokens computed."""

import enum
import time
from dataclasses import dataclass, field

from vllm_runner.lora.request import LoRARequest
from vllm_runner.pooling_params import PoolingParams
from vllm_runner.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    """One sequence to generate (or, with ``pooling``, a prompt to embed: it computes its
    prompt and ends without sampling). A request with n > 1 is fanned out into n of these."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against max_model_len
    seed: int | None = None  # params.seed + completion index
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # under the "priority" policy: lower is served earlier
    # Its place in the order requests reached the scheduler (set there): breaks priority ties,
    # and a preempted request keeps it.
    arrival_index: int = 0
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Tokens sampled on the device but not yet known here (async scheduling runs one step
    # ahead of the results).
    num_inflight: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling; -1 = not yet scheduled
    stop_reason: int | str | None = None
    # Prefix-cache hashes of this request's full blocks, in order (extended as tokens arrive).
    block_hashes: list[bytes] = field(default_factory=list)
    pooling: PoolingParams | None = None  # an embedding request's (pooling_type filled in)
    lora_request: LoRARequest | None = None  # the adapter it runs with (kept when preempted)

    @property
    def reads_prefix_cache(self) -> bool:
        """Whether cached prompt blocks may stand in for computing them: not when every
        prompt position's hidden state is read (prompt logprobs, MEAN / CLS pooling)."""
        if self.pooling is not None:
            return self.pooling.reads_prefix_cache
        return self.params.prompt_logprobs is None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output, without building the concatenation."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids
