"""Per-request front-end state: detokenization, stop strings, logprobs, final outputs."""

import time
from dataclasses import dataclass, field

from vllm_runner.engine.detokenizer import IncrementalDetokenizer
from vllm_runner.engine.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    EngineStepOutput,
    FinalOutput,
    RequestOutput,
    StreamOutput,
)
from vllm_runner.pooling_params import PoolingParams
from vllm_runner.sampling_params import SamplingParams


@dataclass
class CompletionState:
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_times: list[float] = field(default_factory=list)  # when each step's tokens came

    def output(self) -> CompletionOutput:
        return CompletionOutput(
            self.index,
            self.detokenizer.text,
            list(self.token_ids),
            self.cumulative_logprob,
            self.logprobs,
            self.finish_reason,
            self.stop_reason,
        )


@dataclass
class RequestState:
    """A user's request: its ``n`` completions (engine requests ``child_ids``)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    child_ids: list[str]
    completions: list[CompletionState]
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    pooling: PoolingParams | None = None  # an embedding request's
    embedding: list[float] | None = None  # its vector, once computed

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)

    def final_output(self) -> FinalOutput:
        if self.pooling is not None:  # (an empty vector if it failed or was aborted)
            return EmbeddingRequestOutput(
                self.request_id,
                EmbeddingOutput(self.embedding or []),
                self.prompt_token_ids,
                self.finished,
                self.num_cached_tokens,
            )
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            [c.output() for c in self.completions],
            self.finished,
            self.prompt_logprobs,
            self.num_cached_tokens,
        )


def new_request_state(
    request_id: str,
    prompt: str | None,
    prompt_ids: list[int],
    params: SamplingParams,
    tokenizer,
    engine_id: str,
    pooling: PoolingParams | None = None,
) -> RequestState:
    """``engine_id``: unique in the engine's lifetime; its completions run as engine
    requests ``engine_id`` (n = 1) or ``engine_id.i``, so no two requests' ids meet, not even
    a new request reusing an aborted one's id while that one's last step is in flight."""
    child_ids = [engine_id] if params.n == 1 else [f"{engine_id}.{i}" for i in range(params.n)]
    completions = [
        CompletionState(
            i,
            IncrementalDetokenizer(
                tokenizer,
                prompt_ids,
                params.stop,
                params.include_stop_str_in_output,
                params.skip_special_tokens,
                params.min_tokens,
            ),
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None,
        )
        for i in range(params.n)
    ]
    state = RequestState(request_id, prompt, prompt_ids, params, child_ids, completions)
    state.pooling = pooling
    return state


def apply_step_output(state: RequestState, index: int, out: EngineStepOutput) -> str | None:
    """Fold one engine output into a completion; returns a stop string it hit, if any."""
    now = time.monotonic()
    if state.first_token_time is None:
        state.first_token_time = now
        state.num_cached_tokens = out.num_cached_tokens
    if out.prompt_logprobs is not None:
        state.prompt_logprobs = out.prompt_logprobs
    if out.embedding is not None:
        state.embedding = out.embedding
    c = state.completions[index]
    c.token_times.append(now)
    c.token_ids.extend(out.new_token_ids)
    if c.logprobs is not None and out.new_logprobs is not None:
        c.logprobs.extend(out.new_logprobs)
        c.cumulative_logprob += sum(out.new_sampled_logprobs)
    stop = c.detokenizer.add_tokens(out.new_token_ids, out.finish_reason == "stop")
    if stop is not None:
        c.finish_reason, c.stop_reason = "stop", stop
    elif out.finish_reason is not None:
        c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
    return stop


def stream_output(
    state: RequestState,
    index: int,
    new_ids: list[int],
    new_logprobs: list[dict[int, float]] | None,
    prompt_logprobs: list[dict[int, float] | None] | None = None,
    prompt_ranks: list[int | None] | None = None,
) -> StreamOutput:
    c = state.completions[index]
    finished = c.finish_reason is not None
    delta = c.detokenizer.take_delta(finished)
    return StreamOutput(
        state.request_id,
        index,
        delta,
        c.detokenizer.text[: c.detokenizer.sent],  # what the deltas gave: no held-back text
        len(c.token_ids),  # not a copy: a stream of L tokens would copy L^2 / 2 ids
        new_ids,
        new_logprobs,
        finished,
        c.finish_reason,
        state.prompt_token_ids,
        c.stop_reason,
        state.error,
        prompt_logprobs,
        prompt_ranks,
    )
