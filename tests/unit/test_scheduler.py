"""Scheduler: token budget, chunked prefill, FIFO admission, preemption."""

from vllm_runner.config import SchedulerConfig
from vllm_runner.engine.kv_cache_manager import KVCacheManager
from vllm_runner.engine.outputs import ModelRunnerOutput
from vllm_runner.engine.request import Request, RequestStatus
from vllm_runner.engine.scheduler import Scheduler
from vllm_runner.sampling_params import SamplingParams


def make_scheduler(
    num_blocks=64, budget=32, max_seqs=8, block_size=4, caching=True, admission_interval=1
):
    kv = KVCacheManager(num_blocks, block_size, caching)
    config = SchedulerConfig(max_seqs, budget, 1024, admission_interval=admission_interval)
    return Scheduler(config, kv)


def make_request(request_id: str, num_tokens: int, max_tokens: int = 4) -> Request:
    base = 1000 * (ord(request_id[0]) - ord("a"))  # distinct tokens: no prefix-cache hits
    tokens = list(range(base, base + num_tokens))
    return Request(request_id, tokens, SamplingParams(max_tokens=max_tokens), max_tokens)


def fake_run(s: Scheduler, sched_out, token: int = 7) -> ModelRunnerOutput:
    """Sample ``token`` for each request whose scheduled tokens reach its end."""
    return ModelRunnerOutput(
        {
            rid: token
            for rid in sched_out.num_scheduled_tokens
            if s.requests[rid].num_computed_tokens == s.requests[rid].num_tokens
        }
    )


def test_chunked_prefill_then_decode_under_budget():
    s = make_scheduler(budget=16)
    s.add_request(make_request("a", 40))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 16} and [r.request_id for r in out.new_requests] == [
        "a"
    ]
    s.update_from_output(out, ModelRunnerOutput({}))
    out = s.schedule()
    assert (
        out.num_scheduled_tokens == {"a": 16} and out.cached_requests[0].num_computed_tokens == 16
    )
    s.update_from_output(out, ModelRunnerOutput({}))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 8}
    s.update_from_output(out, fake_run(s, out))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 1}  # decode


def test_running_first_then_fifo_admission_within_budget():
    s = make_scheduler(budget=10)
    s.add_request(make_request("a", 6))
    s.add_request(make_request("b", 6))
    s.add_request(make_request("c", 6))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 6, "b": 4}  # b is chunked, c waits
    s.update_from_output(out, fake_run(s, out))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "b": 2, "c": 6}


def test_max_num_seqs_limits_running():
    s = make_scheduler(max_seqs=2)
    for name in "abc":
        s.add_request(make_request(name, 3))
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["a", "b"]


def test_preemption_frees_newest_and_requeues_it_first():
    s = make_scheduler(num_blocks=4, budget=64, block_size=4)
    s.add_request(make_request("a", 8, max_tokens=8))  # 2 blocks
    s.add_request(make_request("b", 8, max_tokens=8))  # 2 blocks: pool is full
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 8, "b": 8}
    s.update_from_output(out, fake_run(s, out))
    out = s.schedule()  # a needs a 3rd block: b (newest) is preempted
    assert out.num_scheduled_tokens == {"a": 1}
    assert "b" in out.finished_req_ids
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting.peek() is b and b.output_token_ids == [7]
    assert s.stats()["num_preemptions"] == 1
    assert s.kv.pool.num_used_blocks == 3


def test_finish_on_max_tokens_frees_blocks():
    s = make_scheduler()
    s.add_request(make_request("a", 5, max_tokens=2))
    for _ in range(2):
        out = s.schedule()
        results = s.update_from_output(out, fake_run(s, out))
    assert results[0].finish_reason == "length"
    assert not s.has_unfinished() and s.kv.pool.num_used_blocks == 0


def test_same_step_requests_share_blocks_being_computed():
    """KV writes precede attention in every layer, so a block allocated (and hashed) for one
    request this step is a cache hit for the next request admitted in the same step."""
    s = make_scheduler(budget=64, block_size=4)
    shared = list(range(500, 508))  # two full blocks
    s.add_request(Request("a", shared + [1, 2], SamplingParams(max_tokens=4), 4))
    s.add_request(Request("b", shared + [3], SamplingParams(max_tokens=4), 4))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 10, "b": 1}
    assert s.kv.block_ids("b")[:2] == s.kv.block_ids("a")[:2]


def test_a_prefix_still_being_prefilled_is_shared_once_computed():
    """a's prompt takes the whole budget (no admission behind it); b, sharing its first
    two blocks, is admitted next step and hits both instead of computing them again."""
    s = make_scheduler(budget=6, block_size=4)
    shared = list(range(500, 508))  # two full blocks
    s.add_request(Request("a", shared + [1, 2], SamplingParams(max_tokens=4), 4))
    s.add_request(Request("b", shared + [3], SamplingParams(max_tokens=4), 4))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 6}  # b would recompute a's second block
    s.update_from_output(out, fake_run(s, out))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 4, "b": 1}  # b: only its last token
    assert s.requests["b"].num_cached_tokens == 8
    assert s.kv.block_ids("b")[:2] == s.kv.block_ids("a")[:2]


def test_identical_prompts_of_whole_blocks_are_admitted_together():
    """The block of a prompt's last token is always computed, never a hit: a copy of a
    prompt of whole blocks (n > 1 siblings, repeated prompts) must not wait a step for it
    (they were admitted one per step)."""
    s = make_scheduler(budget=64, block_size=4, max_seqs=8)
    prompt = list(range(500, 508))  # exactly two blocks
    for rid in "abcd":
        s.add_request(Request(rid, list(prompt), SamplingParams(max_tokens=4), 4))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 8, "b": 4, "c": 4, "d": 4}
    assert all(s.kv.block_ids(r)[0] == s.kv.block_ids("a")[0] for r in "bcd")


def test_prefix_cache_counters_count_only_requests_that_read_it():
    """As vLLM: no queries with caching off, nor for prompt_logprobs requests (which skip
    the cache), so the exported hit rate is not diluted."""
    off = make_scheduler(caching=False)
    off.add_request(make_request("a", 10))
    off.schedule()
    assert off.counters["prefix_cache_queries"] == 0
    on = make_scheduler()
    on.add_request(
        Request("a", list(range(10)), SamplingParams(max_tokens=4, prompt_logprobs=0), 4)
    )
    on.add_request(make_request("b", 10))
    on.schedule()
    assert on.counters["prefix_cache_queries"] == 10


def test_aborting_queued_requests_keeps_the_queue_consistent():
    """Queued requests that finish (abort) stay in the queue until they reach its head
    (no O(queue) search per abort); counts, admission order and idleness stay right."""
    s = make_scheduler(budget=8, max_seqs=2)
    for rid in "abcdef":
        s.add_request(make_request(rid, 4))
    s.finish_request("b", RequestStatus.FINISHED_ABORTED)
    s.finish_request("e", RequestStatus.FINISHED_ABORTED)
    assert s.stats()["num_waiting"] == 4
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["a", "c"]
    assert s.stats()["num_waiting"] == 2
    for rid in "acdf":
        s.finish_request(rid, RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished() and len(s.waiting) == 0 and s.stats()["num_waiting"] == 0
    s.add_request(make_request("g", 4))
    assert list(s.schedule().num_scheduled_tokens) == ["g"]


def test_queued_requests_aborted_behind_others_are_dropped_when_the_last_one_finishes():
    """Aborted while a live request was queued ahead; that one runs and finishes: the
    queue then holds only finished requests and lets them go (they stayed referenced
    while the engine was idle)."""
    s = make_scheduler(budget=8, max_seqs=1)
    for rid in "abc":
        s.add_request(make_request(rid, 4))
    s.schedule()  # a runs; b and c wait
    s.finish_request("c", RequestStatus.FINISHED_ABORTED)
    s.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert list(s.schedule().num_scheduled_tokens) == ["b"]
    assert [r.request_id for r in s.waiting] == ["c"]  # gone, not yet at the head
    s.finish_request("b", RequestStatus.FINISHED_STOPPED)
    assert len(s.waiting) == 0 and not s.has_unfinished()


def step(s: Scheduler) -> dict[str, int]:
    out = s.schedule()
    s.update_from_output(out, fake_run(s, out))
    return out.num_scheduled_tokens


def test_admission_interval_lets_decode_steps_run_alone():
    """While requests decode, waiting ones join every third step only: the two steps between
    stay pure decode (CUDA-graph steps on a GPU), and requests that arrived meanwhile join
    together."""
    s = make_scheduler(admission_interval=3)
    s.add_request(make_request("a", 4, max_tokens=20))
    assert step(s) == {"a": 4}  # nothing decodes: admitted at once
    s.add_request(make_request("b", 4, max_tokens=20))
    assert step(s) == {"a": 1}
    s.add_request(make_request("c", 4, max_tokens=20))
    assert step(s) == {"a": 1}
    assert step(s) == {"a": 1, "b": 4, "c": 4}  # the third step since "a" joined
    s.add_request(make_request("d", 4, max_tokens=20))
    assert step(s) == {"a": 1, "b": 1, "c": 1}
    assert step(s) == {"a": 1, "b": 1, "c": 1}
    assert step(s) == {"a": 1, "b": 1, "c": 1, "d": 4}


def test_admission_interval_waits_for_nothing_when_a_step_prefills_anyway():
    """A running request's prompt chunk makes the step a prefill step: waiting requests join
    it at once; and after a quiet spell a new request is not held back."""
    s = make_scheduler(budget=8, admission_interval=4)
    s.add_request(make_request("a", 20, max_tokens=20))
    assert step(s) == {"a": 8}
    s.add_request(make_request("b", 4, max_tokens=20))
    assert step(s) == {"a": 8}  # the budget is spent on a's chunk
    assert step(s) == {"a": 4, "b": 4}  # a's last chunk: b joins it
    for _ in range(4):
        assert step(s) == {"a": 1, "b": 1}
    s.add_request(make_request("c", 4, max_tokens=20))
    assert step(s) == {"a": 1, "b": 1, "c": 4}  # five steps since b joined: not held back


def test_a_prefix_hit_is_not_computed_again():
    """b hits a's two full blocks: the runner is told they are computed (it computes only
    b's last token, at position 8) and b samples in that very step."""
    s = make_scheduler(budget=64, block_size=4)
    shared = list(range(500, 508))
    s.add_request(Request("a", shared + [1, 2], SamplingParams(max_tokens=4), 4))
    assert step(s) == {"a": 10}
    s.add_request(Request("b", shared + [3], SamplingParams(max_tokens=4), 4))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}
    [new] = out.new_requests
    assert (new.request_id, new.num_computed_tokens, new.block_ids) == ("b", 8, [0, 1, 3])
    b = s.requests["b"]
    assert (b.num_computed_tokens, b.num_inflight, b.num_cached_tokens) == (9, 1, 8)


def test_a_request_whose_tokens_in_flight_end_it_is_not_scheduled_again():
    """Overlapped steps (async scheduling): a's one token is sampled in the first step; the
    next schedule() runs before that result is known and must not give a another token (a
    wasted step that would also take a second block)."""
    s = make_scheduler(block_size=4)
    s.add_request(make_request("a", 4, max_tokens=1))
    first = s.schedule()
    assert first.num_scheduled_tokens == {"a": 4}
    second = s.schedule()
    assert second.num_scheduled_tokens == {} and s.kv.block_ids("a") == [0]
    [result] = s.update_from_output(first, ModelRunnerOutput({"a": 7}))
    assert result.finish_reason == "length" and s.kv.pool.num_used_blocks == 0


def test_a_preempted_request_keeps_its_first_prefix_cache_count():
    """b computed its prompt, was preempted, and is admitted again with a hit on its own
    first block: num_cached_tokens (reported to the user) stays that of its first admission
    (0), and the prefix-cache counters count its prompt once."""
    s = make_scheduler(num_blocks=4, budget=64, block_size=4)
    s.add_request(make_request("a", 8, max_tokens=2))
    s.add_request(make_request("b", 8, max_tokens=8))
    assert step(s) == {"a": 8, "b": 8}
    assert step(s) == {"a": 1}  # a takes a third block: b is preempted
    assert s.stats()["num_preemptions"] == 1 and "a" not in s.requests  # a is done
    out = s.schedule()
    assert out.num_scheduled_tokens == {"b": 5}  # 8 prompt + 1 output, first block a hit
    assert out.new_requests[0].num_computed_tokens == 4
    assert s.kv.block_ids("b") == [2, 3, 1]
    assert s.requests["b"].num_cached_tokens == 0
    assert (s.counters["prefix_cache_queries"], s.counters["prefix_cache_hits"]) == (16, 0)
