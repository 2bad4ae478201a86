"""Scheduler + KV cache manager against a model of the runner: random requests sharing
prefixes, a tiny cache (preemption), aborts at any point, n > 1 copies, stop tokens,
min_tokens, overlapped steps, either scheduling policy (random priorities). The fake runner
writes each token's "KV" (a hash of the token and everything before it) into the slots the
block table gives, and checks, wherever it samples, that the request's slots hold its own
prefix: a wrong prefix-cache hit, a block reused while held, or a wrong block table shows
there."""

import random

import pytest

from vllm_runner.config import SchedulerConfig
from vllm_runner.engine.kv_cache_manager import KVCacheManager
from vllm_runner.engine.outputs import ModelRunnerOutput, SchedulerOutput
from vllm_runner.engine.request import Request, RequestStatus
from vllm_runner.engine.request_queue import priority_key
from vllm_runner.engine.scheduler import Scheduler
from vllm_runner.sampling_params import SamplingParams

BS = 4
VOCAB = 6
EOS = 0


def sample(tokens: list[int], salt: int, num_prompt: int, params: SamplingParams) -> int:
    """A deterministic "model": the next token of a sequence (stop tokens held back before
    min_tokens, as the sampler does)."""
    token = hash((tuple(tokens), salt)) % VOCAB
    banned = {EOS, *params.stop_token_ids}
    while len(tokens) - num_prompt < params.min_tokens and token in banned:
        token = (token + 1) % VOCAB
    return token


def reference(prompt: list[int], salt: int, params: SamplingParams, max_tokens: int, max_len: int):
    """The tokens and finish reason of a request run alone."""
    tokens, out = list(prompt), []
    while True:
        token = sample(tokens, salt, len(prompt), params)
        tokens.append(token)
        out.append(token)
        if len(out) >= params.min_tokens and (
            (not params.ignore_eos and token == EOS) or token in params.stop_token_ids
        ):
            return out, "stop"
        if len(out) >= max_tokens or len(tokens) >= max_len:
            return out, "length"


class FakeRunner:
    def __init__(self, salts: dict[str, int]) -> None:
        self.salts = salts
        self.states: dict[str, dict] = {}
        self.kv: dict[int, int] = {}  # slot -> hash of the token there and its prefix

    def release(self, ids) -> None:
        for rid in ids:
            self.states.pop(rid, None)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.release(sched.finished_req_ids)
        for new in sched.new_requests:
            assert new.request_id not in self.states
            self.states[new.request_id] = dict(
                tokens=list(new.token_ids),
                blocks=list(new.block_ids),
                computed=new.num_computed_tokens,
                params=new.params,
                num_prompt=new.num_prompt_tokens,
            )
        for cached in sched.cached_requests:
            st = self.states[cached.request_id]
            st["blocks"].extend(cached.new_block_ids)
            assert st["computed"] == cached.num_computed_tokens
        spans = {}
        for rid, n in sched.num_scheduled_tokens.items():
            st = self.states[rid]
            lo, hi = st["computed"], st["computed"] + n
            assert hi <= len(st["tokens"]), (rid, lo, hi, len(st["tokens"]))
            assert hi <= len(st["blocks"]) * BS
            for p in range(lo, hi):
                self.kv[self.slot(st, p)] = hash(tuple(st["tokens"][: p + 1]))
            st["computed"] = hi
            spans[rid] = hi
        sampled = {}
        for rid, hi in spans.items():
            st = self.states[rid]
            if hi < len(st["tokens"]):
                continue
            for p in range(hi):  # attention reads every slot of the prefix
                assert self.kv.get(self.slot(st, p)) == hash(tuple(st["tokens"][: p + 1])), (
                    f"{rid}: slot of position {p} holds another prefix's KV"
                )
            token = sample(st["tokens"], self.salts[rid], st["num_prompt"], st["params"])
            st["tokens"].append(token)
            sampled[rid] = token
        return ModelRunnerOutput(sampled)

    def slot(self, st: dict, p: int) -> int:
        return st["blocks"][p // BS] * BS + p % BS


def check_invariants(s: Scheduler) -> None:
    kv = s.kv
    holders: dict[int, int] = {}
    for blocks in kv.req_blocks.values():
        for b in blocks:
            holders[b.block_id] = holders.get(b.block_id, 0) + 1
    for b in kv.pool.blocks:
        assert b.ref_cnt == holders.get(b.block_id, 0), (b, holders.get(b.block_id, 0))
        assert (b.ref_cnt == 0) == (b.block_id in kv.pool._free)
        if b.block_hash is not None:
            assert kv.pool._cached[b.block_hash][b.block_id] is b
    assert sum(len(c) for c in kv.pool._cached.values()) == sum(
        b.block_hash is not None for b in kv.pool.blocks
    )
    running = {r.request_id for r in s.running}
    assert all(r.status == RequestStatus.RUNNING for r in s.running)
    assert set(kv.req_blocks) == running
    for r in s.running:
        assert len(kv.req_blocks[r.request_id]) * BS >= r.num_computed_tokens
    queued = [r for r in s.waiting if not r.status.finished]
    assert len(queued) == len(s.waiting) - s._num_gone
    assert len({r.request_id for r in queued}) == len(queued)
    assert {r.request_id for r in queued} | running == set(s.requests)
    assert all(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) for r in queued)


def run_random(seed: int, overlap: bool, policy: str = "fcfs") -> None:
    rng = random.Random(seed)
    max_len = 48
    num_blocks = rng.randint(6, 14)
    config = SchedulerConfig(
        rng.randint(1, 6), rng.choice([3, 5, 8, 16, 64]), max_len,
        admission_interval=rng.choice([1, 1, 2, 3]), scheduling_policy=policy,
    )  # fmt: skip
    s = Scheduler(config, KVCacheManager(num_blocks, BS, enable_caching=True))
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(3)]
    salts: dict[str, int] = {}
    runner = FakeRunner(salts)
    expected, got, finish, aborted = {}, {}, {}, set()
    pending = None
    next_id = 0

    def add() -> None:
        nonlocal next_id
        prompt = rng.choice(prefixes) + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 10))]
        prompt = prompt[: max_len - 1] or [1]
        max_tokens = rng.randint(1, 20)
        params = SamplingParams(
            max_tokens=max_tokens,
            ignore_eos=rng.random() < 0.5,
            stop_token_ids=[rng.randrange(VOCAB)] if rng.random() < 0.3 else None,
            min_tokens=min(rng.choice([0, 0, 2, 5]), max_tokens),
            prompt_logprobs=0 if rng.random() < 0.1 else None,
        )
        params.all_stop_token_ids = {EOS}
        max_tokens = min(params.max_tokens, max_len - len(prompt))
        # whole cache fits: checked by the input processor
        if -(-(len(prompt) + max_tokens - 1) // BS) > num_blocks:
            return
        salt = rng.randrange(3)
        priority = rng.choice([-1, 0, 0, 1]) if policy == "priority" else 0
        for _ in range(rng.choice([1, 1, 1, 2, 3])):  # n > 1: same prompt, other salts
            rid = f"r{next_id}"
            next_id += 1
            salts[rid] = salt
            salt += 1
            expected[rid] = reference(prompt, salts[rid], params, max_tokens, max_len)
            got[rid] = []
            s.add_request(Request(rid, list(prompt), params, max_tokens, priority=priority))

    def step() -> None:
        """schedule -> execute -> update; overlapped, a step's results are read after the
        next step is scheduled and run (as the engine's async scheduling)."""
        nonlocal pending
        sched = s.schedule()
        pending = run_step(s, runner, sched, pending if overlap else False, got, finish)
        check_invariants(s)
        if policy == "priority":  # (its last request is the one preempted)
            keys = [priority_key(r) for r in s.running]
            assert keys == sorted(keys), "running list out of (priority, arrival) order"

    for step_no in range(400):
        if step_no < 250 and rng.random() < 0.4:
            add()
        if s.requests and rng.random() < 0.08:  # waiting, mid-prefill, running or preempted
            rid = rng.choice(sorted(s.requests))
            s.finish_request(rid, RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
            check_invariants(s)
        if s.has_unfinished() or pending is not None:
            step()
        else:
            runner.release(s.take_finished_ids())
    # NOTE: the first request in the policy's order fits alone and is never preempted: it
    # ends within 2 * max_len steps (a bound, so a scheduler that stops making progress
    # fails instead of hanging)
    limit, num_steps = len(expected) * (2 * max_len + 2), 0
    while s.has_unfinished() or pending is not None:
        step()
        num_steps += 1
        assert num_steps < limit, f"no progress: {len(s.requests)} requests left"
    check_outputs(s, expected, got, finish, aborted)


def apply_outputs(s: Scheduler, sched, result, got: dict, finish: dict) -> None:
    """A step's results: each request's new tokens into ``got``, its end into ``finish``."""
    for out in s.update_from_output(sched, result):
        assert out.request_id not in finish, f"{out.request_id}: output after its end"
        got[out.request_id].extend(out.new_token_ids)
        if out.finish_reason is not None:
            finish[out.request_id] = out.finish_reason


def run_step(s: Scheduler, runner, sched, pending, got: dict, finish: dict):
    """Execute ``sched``; ``pending`` False: apply its results now; else (overlapped, as the
    engine's async scheduling) apply the step before's (``pending``, maybe None) and return
    this one's, to be applied after the next step runs."""
    result = runner.execute(sched)
    if pending is False:
        apply_outputs(s, sched, result, got, finish)
        return None
    if pending is not None:
        apply_outputs(s, *pending, got, finish)
    return (sched, result) if not sched.is_empty else None


def check_outputs(s: Scheduler, expected: dict, got: dict, finish: dict, aborted: set) -> None:
    """Every block free, no request left, each request's tokens and finish reason those of
    running it alone (an aborted one's, as far as it got)."""
    assert s.kv.pool.num_used_blocks == 0 and not s.requests and not s.running
    for rid, (tokens, reason) in expected.items():
        if rid in aborted:
            assert got[rid] == tokens[: len(got[rid])], rid
        else:
            assert (got[rid], finish.get(rid)) == (tokens, reason), rid


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_random_requests_against_a_model_of_the_runner(seed, overlap, policy):
    run_random(seed, overlap, policy)
