"""Token-budget continuous batching: one rule for prefill, chunked prefill and decode."""

import itertools

from vllm_runner.config import SchedulerConfig
from vllm_runner.engine.kv_cache_manager import KVCacheManager
from vllm_runner.engine.outputs import (
    CachedRequestData,
    EngineStepOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from vllm_runner.engine.request import Request, RequestStatus
from vllm_runner.engine.request_queue import request_queue


class Scheduler:
    """Each step, running requests get their next tokens first, then waiting requests are
    admitted, within ``max_num_batched_tokens`` and ``max_num_seqs``. A request is just
    tokens computed so far vs tokens known. When blocks run out, the running request last
    in the policy's order is preempted and will recompute.

    ``scheduling_policy`` (``request_queue``): "fcfs" admits in arrival order, and preempts
    the newest running request; "priority" admits by (priority, arrival), keeps the running
    list in that order too (its requests get their tokens in it), and preempts the running
    request of the largest (priority, arrival). A waiting request never preempts a running
    one: it waits for blocks and a free seat as under "fcfs".

    With ``admission_interval`` N > 1, waiting requests join a batch of decoding requests
    on every N-th step only (or at once when nothing decodes, or when a running request's
    prompt chunk makes the step a prefill step anyway): under steady arrivals, N - 1 steps of
    N stay pure decode, which the runner replays as CUDA graphs, at the cost of up to N - 1
    steps of time to first token per admission round (a request that does not fit waits for
    the next round). Similar in aim to vLLM V0's ``scheduler_delay_factor``, which waits on
    the oldest request's age instead; after a quiet spell a request joins at once here."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.requests: dict[str, Request] = {}
        self.waiting = request_queue(config.scheduling_policy)
        self._num_gone = 0  # finished requests still in ``waiting``: dropped at the head
        self._arrivals = itertools.count()
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()  # since the last schedule()
        self._runner_has: set[str] = set()  # requests whose state the runner holds
        self._steps_since_admission = config.admission_interval
        self.counters = dict.fromkeys(
            (
                "num_preemptions",
                "prefix_cache_queries",
                "prefix_cache_hits",
                "prompt_tokens_total",
                "generation_tokens_total",
            ),
            0,
        )

    # ---- admission -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        request.arrival_index = next(self._arrivals)
        self.waiting.add(request)

    def has_unfinished(self) -> bool:
        return len(self.waiting) > self._num_gone or bool(self.running)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:  # queued: left there (a search and a removal per abort made bulk aborts
            self._num_gone += 1  # quadratic), dropped when it reaches the head
        if self._num_gone == len(self.waiting):  # all queued are gone: nothing keeps them
            self.waiting.clear()
            self._num_gone = 0
        request.status = status
        self.kv.free(request, uncache=status == RequestStatus.FINISHED_ERROR)
        self._finished_ids.add(request_id)
        return request

    # ---- scheduling ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted = False
        prefilling = False  # a running request computes more than one token this step

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            known = request.num_tokens + request.num_inflight  # sampled, on the host or not
            if request.num_inflight and self._will_finish(request, known):
                i += 1  # its in-flight token ends it: nothing more to compute
                continue
            num_new = min(known - request.num_computed_tokens, budget)
            while (new_blocks := self.kv.allocate_slots(request, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                num_scheduled[request.request_id] = num_new
                budget -= num_new
                prefilling |= num_new > 1
                if request.request_id in self._runner_has:
                    cached_reqs.append(
                        CachedRequestData(
                            request.request_id, new_blocks, request.num_computed_tokens
                        )
                    )
                else:
                    new_reqs.append(self._new_request_data(request))
                request.num_computed_tokens += num_new
                if request.num_computed_tokens == known:
                    request.num_inflight += 1  # this step samples its next token
                i += 1

        self._steps_since_admission += 1
        may_admit = (
            not num_scheduled
            or prefilling
            or self._steps_since_admission >= self.config.admission_interval
        )
        if not preempted and may_admit and self._admit_waiting(budget, num_scheduled, new_reqs):
            self._steps_since_admission = 0

        finished = self.take_finished_ids()
        self._runner_has.update(num_scheduled)
        return SchedulerOutput(
            new_reqs, cached_reqs, num_scheduled, sum(num_scheduled.values()), finished
        )

    def take_finished_ids(self) -> set[str]:
        """Requests finished since the last step, for the runner to forget (passed in the
        next step's output, or at once when the engine goes idle)."""
        finished, self._finished_ids = self._finished_ids, set()
        self._runner_has -= finished
        return finished

    def _admit_waiting(
        self, budget: int, num_scheduled: dict[str, int], new_reqs: list[NewRequestData]
    ) -> bool:
        """Admit waiting requests in the policy's order; True if any was."""
        num_new_reqs = len(new_reqs)
        skipped: list[Request] = []  # waiting for one of the running adapters to finish
        loras = self._running_loras() if self.config.max_loras else set()
        # NOTE: a prompt block is in the prefix index from its allocation, so a request
        # sharing a prefix another computes in this very step hits it (each layer writes the
        # step's keys and values before any of its attention reads them); and a running
        # prompt still to compute beyond this step has taken the whole budget: none is
        # admitted behind it.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            if request.status.finished:
                self.waiting.pop()
                self._num_gone -= 1
                continue
            lora = request.lora_request
            new_lora = lora is not None and lora.lora_int_id not in loras
            if new_lora and len(loras) >= self.config.max_loras:  # a step runs max_loras
                skipped.append(self.waiting.pop())
                continue
            hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            reads_cache = self.kv.enable_caching and request.reads_prefix_cache
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            request.num_computed_tokens = 0
            if self.kv.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.pop()
            if lora is not None:
                loras.add(lora.lora_int_id)
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
                if reads_cache:  # as vLLM: only requests that look the cache up count
                    self.counters["prefix_cache_queries"] += request.num_tokens
                    self.counters["prefix_cache_hits"] += num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.waiting.place(self.running, request)
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            new_reqs.append(self._new_request_data(request))
            request.num_computed_tokens += num_new
            if request.num_computed_tokens == request.num_tokens + request.num_inflight:
                request.num_inflight += 1  # this step samples its next token
        for request in reversed(skipped):  # back in their places, ahead of later arrivals
            self.waiting.requeue(request)
        return len(new_reqs) > num_new_reqs

    def _running_loras(self) -> set[int]:
        """The adapters of the running requests: every step runs only these (each running
        request may be scheduled in it), so at most ``max_loras`` of them."""
        return {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}

    def _will_finish(self, request: Request, known: int) -> bool:
        """True when the ``known`` tokens (prompt, output and in-flight ones) reach
        max_tokens / max_model_len."""
        return (
            known - request.num_prompt_tokens >= request.max_tokens
            or known >= self.config.max_model_len
        )

    def _new_request_data(self, request: Request) -> NewRequestData:
        return NewRequestData(
            request.request_id,
            request.all_token_ids,
            request.num_prompt_tokens,
            request.params,
            self.kv.block_ids(request.request_id),
            request.num_computed_tokens,
            request.seed,
            request.pooling,
            request.lora_request,
        )

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        self.waiting.requeue(request)
        self._finished_ids.add(request.request_id)  # the runner drops its state
        self.counters["num_preemptions"] += 1

    # ---- results ---------------------------------------------------------------------------
    def update_from_output(
        self, sched: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[EngineStepOutput]:
        outputs = []
        for request_id in sched.num_scheduled_tokens:
            request = self.requests.get(request_id)
            if request is None:  # aborted while the step ran
                continue
            token = result.sampled.get(request_id)
            if token is None:
                embedding = result.pooled.get(request_id)
                if embedding is not None:  # an embedding request's last prompt chunk ran
                    outputs.append(self._pooled(request, embedding))
                continue  # (else a prefill chunk that does not reach the end yet)
            request.num_inflight -= 1
            if not request.output_token_ids:
                self.counters["prompt_tokens_total"] += request.num_prompt_tokens
            request.output_token_ids.append(token)
            lp = result.logprobs.get(request_id)
            status = self._check_stop(request, token)
            outputs.append(
                EngineStepOutput(
                    request_id,
                    [token],
                    [lp[1]] if lp else None,
                    [lp[0]] if lp else None,
                    status.finish_reason if status else None,
                    request.stop_reason,
                    result.prompt_logprobs.get(request_id),
                    max(request.num_cached_tokens, 0),
                    result.prompt_ranks.get(request_id),
                )
            )
            if status is not None:
                self.finish_request(request_id, status)
        # one token each (an embedding request's output has none)
        self.counters["generation_tokens_total"] += sum(1 for o in outputs if o.new_token_ids)
        return outputs

    def _pooled(self, request: Request, embedding: list[float]) -> EngineStepOutput:
        """An embedding request ends with its pooled vector: no decode step, its blocks
        freed (full ones stay in the prefix cache)."""
        request.num_inflight -= 1
        self.counters["prompt_tokens_total"] += request.num_prompt_tokens
        self.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
        return EngineStepOutput(
            request.request_id, [], None, None, "stop",
            num_cached_tokens=max(request.num_cached_tokens, 0), embedding=embedding,
        )  # fmt: skip

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.params
        num_out = len(request.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token in params.all_stop_token_ids:
                request.stop_reason = None if token == params.eos_token_id else token
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if num_out >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def stats(self) -> dict[str, int]:
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting) - self._num_gone,
            "kv_blocks_total": self.kv.num_blocks,
            "kv_blocks_used": self.kv.pool.num_used_blocks,
            **self.counters,
        }
