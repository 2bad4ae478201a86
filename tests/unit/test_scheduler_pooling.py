"""Scheduler: an embedding request (Request.pooling) is a prompt computed chunk by chunk that
ends with its pooled vector: no decode step, every block back in the pool (exact ids and
counts), and MEAN / CLS requests never start from prefix-cache hits."""

import dataclasses

from vllm_runner.config import SchedulerConfig
from vllm_runner.engine.kv_cache_manager import KVCacheManager
from vllm_runner.engine.outputs import EngineStepOutput, ModelRunnerOutput
from vllm_runner.engine.request import Request, RequestStatus
from vllm_runner.engine.scheduler import Scheduler
from vllm_runner.pooling_params import PoolingParams
from vllm_runner.sampling_params import SamplingParams

VECTOR = [0.6, 0.8]


def make_scheduler(num_blocks: int = 8, budget: int = 8, block_size: int = 4) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_caching=True)
    return Scheduler(SchedulerConfig(4, budget, 1024), kv)


def embedding(request_id: str, tokens: list[int], kind: str = "LAST") -> Request:
    pooling = PoolingParams(normalize=True)
    pooling.pooling_type = kind  # (the engine fills it from its pooler_config)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    return Request(request_id, tokens, params, 1, pooling=pooling)


def test_an_embedding_ends_after_its_last_chunk_and_frees_every_block():
    s = make_scheduler()
    s.add_request(embedding("e", list(range(10))))
    first = s.schedule()
    assert first.num_scheduled_tokens == {"e": 8}
    [new] = first.new_requests
    assert new.block_ids == [0, 1] and new.pooling.pooling_type == "LAST"
    assert s.kv.pool.num_free_blocks == 6
    assert s.update_from_output(first, ModelRunnerOutput({})) == []  # a chunk: nothing yet
    second = s.schedule()
    assert second.num_scheduled_tokens == {"e": 2}
    assert second.cached_requests[0].new_block_ids == [2]
    assert s.kv.pool.num_free_blocks == 5 and s.requests["e"].num_inflight == 1
    outs = s.update_from_output(second, ModelRunnerOutput({}, pooled={"e": VECTOR}))
    assert outs == [
        EngineStepOutput("e", [], None, None, "stop", num_cached_tokens=0, embedding=VECTOR)
    ]
    assert s.kv.pool.num_free_blocks == 8 and s.kv.req_blocks == {}
    assert s.kv.num_cached_blocks == {} and not s.has_unfinished()
    after = s.schedule()  # no decode step; the runner is told to drop the request
    assert after.is_empty and after.finished_req_ids == {"e"}
    stats = s.stats()
    assert (stats["prompt_tokens_total"], stats["generation_tokens_total"]) == (10, 0)
    assert stats["kv_blocks_used"] == 0


def test_async_scheduling_schedules_nothing_more_while_the_vector_is_in_flight():
    s = make_scheduler()
    s.add_request(embedding("e", list(range(6))))
    launched = s.schedule()
    assert launched.num_scheduled_tokens == {"e": 6}
    nxt = s.schedule()  # the step after, scheduled before the first one's results
    assert nxt.is_empty and s.kv.pool.num_free_blocks == 6
    outs = s.update_from_output(launched, ModelRunnerOutput({}, pooled={"e": VECTOR}))
    assert [o.embedding for o in outs] == [VECTOR]
    assert s.kv.pool.num_free_blocks == 8 and not s.has_unfinished()


def test_a_preempted_embedding_restarts_and_still_frees_everything():
    s = make_scheduler(num_blocks=5, budget=12)
    s.add_request(Request("g", list(range(100, 108)), SamplingParams(max_tokens=8), 8))
    s.add_request(embedding("e", list(range(200, 212)), "MEAN"))
    out = s.schedule()  # g's prompt: 2 blocks; e's first chunk: 1 block
    assert out.num_scheduled_tokens == {"g": 8, "e": 4} and s.kv.pool.num_free_blocks == 2
    s.update_from_output(out, ModelRunnerOutput({"g": 1}))
    out = s.schedule()  # g's decode takes a block; e's next 8 tokens need 2: e is preempted
    assert out.num_scheduled_tokens == {"g": 1} and out.finished_req_ids == {"e"}
    assert s.requests["e"].status == RequestStatus.PREEMPTED
    assert s.kv.block_ids("e") == [] and s.kv.pool.num_free_blocks == 2
    s.update_from_output(out, ModelRunnerOutput({"g": 2}))
    s.finish_request("g", RequestStatus.FINISHED_ABORTED)
    out = s.schedule()  # e again from its first token (a MEAN request reads no cache hit)
    assert out.num_scheduled_tokens == {"e": 12} and out.new_requests[0].num_computed_tokens == 0
    outs = s.update_from_output(out, ModelRunnerOutput({}, pooled={"e": VECTOR}))
    assert [o.embedding for o in outs] == [VECTOR]
    assert s.kv.pool.num_free_blocks == 5 and s.kv.req_blocks == {}
    assert s.stats()["num_preemptions"] == 1


def test_only_last_token_pooling_starts_from_prefix_cache_hits():
    tokens = list(range(12))  # 3 full blocks of 4: 2 may be hits (the last token recomputes)
    for kind, hit in (("LAST", 8), ("MEAN", 0), ("CLS", 0)):
        s = make_scheduler(num_blocks=16, budget=16)
        s.add_request(Request("g", tokens, SamplingParams(max_tokens=1), 1))
        out = s.schedule()
        s.update_from_output(out, ModelRunnerOutput({"g": 3}))
        s.add_request(embedding("e", list(tokens), kind))
        out = s.schedule()
        assert out.num_scheduled_tokens == {"e": 12 - hit}
        assert out.new_requests[0].num_computed_tokens == hit
        stats = s.stats()
        queried = 12 if kind == "LAST" else 0  # (only requests that look the cache up count)
        assert (stats["prefix_cache_hits"], stats["prefix_cache_queries"]) == (hit, 12 + queried)


def test_a_request_without_pooling_is_unchanged():
    request = embedding("e", [1, 2])
    plain = dataclasses.replace(request, pooling=None)
    assert request.reads_prefix_cache and plain.reads_prefix_cache
    logprobs = dataclasses.replace(plain, params=SamplingParams(prompt_logprobs=1))
    assert not logprobs.reads_prefix_cache
