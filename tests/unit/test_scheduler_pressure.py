"""The scheduler under cache and budget pressure, against the model of the runner in
test_scheduler_model: requests that need nearly the whole cache, long prompts behind a stream
of short ones, step budgets of one token or less than a block, max_num_seqs of one, aborts of
preempted requests. Each step checks the budget, max_num_seqs, ref counts, and FCFS order (the
queue and the running list stay in arrival order: the newest running request is the one
preempted, and it goes back ahead of every request that came after it); every request must
finish within a bound on steps, with the tokens it gets alone."""

import random

import pytest
from test_scheduler_model import (
    BS,
    EOS,
    VOCAB,
    FakeRunner,
    check_invariants,
    check_outputs,
    reference,
    run_step,
)

from vllm_runner.config import SchedulerConfig
from vllm_runner.engine.kv_cache_manager import KVCacheManager
from vllm_runner.engine.request import Request, RequestStatus
from vllm_runner.engine.scheduler import Scheduler
from vllm_runner.sampling_params import SamplingParams

MAX_LEN = 48


def check_order(s: Scheduler, arrival: dict[str, int]) -> None:
    queued = [arrival[r.request_id] for r in s.waiting if not r.status.finished]
    running = [arrival[r.request_id] for r in s.running]
    assert queued == sorted(queued), "queue out of arrival order"
    assert running == sorted(running), "running list out of arrival order"
    if queued and running:
        assert running[-1] < queued[0], "a request admitted ahead of an older one"


def run_pressure(seed: int, overlap: bool) -> None:
    rng = random.Random(seed)
    num_blocks = rng.randint(2, 10)
    budget = rng.choice([1, 2, BS - 1, BS, BS + 1, 64])
    max_num_seqs = rng.choice([1, 2, 3, 16])
    config = SchedulerConfig(
        max_num_seqs, budget, MAX_LEN, admission_interval=rng.choice([1, 1, 1, 3])
    )
    s = Scheduler(config, KVCacheManager(num_blocks, BS, enable_caching=rng.random() < 0.7))
    capacity = min(num_blocks * BS + 1, MAX_LEN)  # prompt + new tokens one request can hold
    prefix = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 2 * BS))]
    salts: dict[str, int] = {}
    runner = FakeRunner(salts)
    expected, got, finish, aborted, arrival = {}, {}, {}, set(), {}
    pending = None

    def add(total: int) -> None:
        """A request of about ``total`` prompt + new tokens (the whole cache at most)."""
        total = max(2, min(total, capacity))
        num_prompt = rng.randint(1, total - 1)
        prompt = (prefix + [rng.randrange(VOCAB) for _ in range(num_prompt)])[:num_prompt]
        params = SamplingParams(max_tokens=total - num_prompt, ignore_eos=rng.random() < 0.8)
        params.all_stop_token_ids = {EOS}
        for _ in range(rng.choice([1, 1, 1, 2])):  # n > 1: same prompt, other salts
            rid = f"r{len(arrival)}"
            arrival[rid] = len(arrival)
            salts[rid] = len(arrival) % 3
            expected[rid] = reference(prompt, salts[rid], params, params.max_tokens, MAX_LEN)
            got[rid] = []
            s.add_request(Request(rid, list(prompt), params, params.max_tokens))

    def step() -> None:
        nonlocal pending
        sched = s.schedule()
        assert sched.total_num_scheduled_tokens <= budget
        assert all(n > 0 for n in sched.num_scheduled_tokens.values())
        assert len(s.running) <= max_num_seqs
        pending = run_step(s, runner, sched, pending if overlap else False, got, finish)
        check_invariants(s)
        check_order(s, arrival)

    for _ in range(rng.randint(1, 3)):  # giants first: the stream below must not starve them
        add(capacity - rng.randint(0, 2))
    num_steps = 0
    for _ in range(150):
        if rng.random() < 0.5:
            add(rng.choice([2, 3, BS, capacity // 2, capacity]))
        preempted = [r for r in s.waiting if r.status == RequestStatus.PREEMPTED]
        if s.requests and rng.random() < (0.3 if preempted else 0.04):
            rid = rng.choice(preempted).request_id if preempted else rng.choice(sorted(s.requests))
            s.finish_request(rid, RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
            check_invariants(s)
        if s.has_unfinished() or pending is not None:
            step()
            num_steps += 1
        else:
            runner.release(s.take_finished_ids())
    # NOTE: the oldest request is never preempted (it fits alone) and heads the running list
    # with the whole budget: it computes a token a step, so it ends within 2 * MAX_LEN steps
    limit = 150 + len(arrival) * (2 * MAX_LEN + 2)
    while s.has_unfinished() or pending is not None:
        step()
        num_steps += 1
        assert num_steps < limit, f"no progress: {len(s.requests)} requests left"
    check_outputs(s, expected, got, finish, aborted)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("seed", range(30))
def test_requests_under_cache_and_budget_pressure(seed, overlap):
    run_pressure(seed, overlap)
