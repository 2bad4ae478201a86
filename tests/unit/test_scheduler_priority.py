"""Scheduler under scheduling_policy="priority": admission by (priority, arrival), the running
request of the largest (priority, arrival) preempted when blocks run out, aborted waiting
requests dropped at the head of the heap; "fcfs" ignores priorities."""

import pytest
from test_scheduler import fake_run, make_request

from vllm_runner.config import SchedulerConfig
from vllm_runner.engine.kv_cache_manager import KVCacheManager
from vllm_runner.engine.request import Request, RequestStatus
from vllm_runner.engine.request_queue import FCFSQueue, PriorityQueue, request_queue
from vllm_runner.engine.scheduler import Scheduler


def make_scheduler(policy="priority", num_blocks=64, budget=64, max_seqs=8, block_size=4):
    kv = KVCacheManager(num_blocks, block_size, True)
    return Scheduler(SchedulerConfig(max_seqs, budget, 1024, scheduling_policy=policy), kv)


def add(s: Scheduler, request_id: str, priority: int, num_tokens=3, max_tokens=1) -> Request:
    request = make_request(request_id, num_tokens, max_tokens)
    request.priority = priority
    s.add_request(request)
    return request


def run_one_at_a_time(s: Scheduler) -> list[str]:
    """With max_num_seqs 1 and one token to generate each: the order requests run in."""
    order = []
    while s.has_unfinished():
        out = s.schedule()
        order += list(out.num_scheduled_tokens)
        s.update_from_output(out, fake_run(s, out))
    return order


def test_admission_by_priority_then_arrival():
    s = make_scheduler(max_seqs=1)
    for rid, priority in [("a", 0), ("b", -1), ("c", -1), ("d", 2), ("e", 0)]:
        add(s, rid, priority)
    assert run_one_at_a_time(s) == ["b", "c", "a", "e", "d"]


def test_fcfs_admits_in_arrival_order_whatever_the_priorities():
    s = make_scheduler("fcfs", max_seqs=1)
    for rid, priority in [("a", 0), ("b", -1), ("c", -1), ("d", 2), ("e", 0)]:
        add(s, rid, priority)
    assert isinstance(s.waiting, FCFSQueue)
    assert run_one_at_a_time(s) == ["a", "b", "c", "d", "e"]


def test_a_later_arrival_of_higher_priority_is_admitted_next():
    s = make_scheduler(max_seqs=1)
    add(s, "a", 0, max_tokens=2)
    add(s, "b", 1)
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["a"]
    s.update_from_output(out, fake_run(s, out))
    add(s, "c", 0)  # behind a (still running), ahead of b
    assert run_one_at_a_time(s) == ["a", "c", "b"]


def fill(policy: str) -> Scheduler:
    """Three requests of two full blocks each in a cache of six blocks: a (priority 0, the
    oldest), b (priority 5) and c (priority 0, the newest). Their first tokens sampled, each
    needs a third block."""
    s = make_scheduler(policy, num_blocks=6)
    for rid, priority in [("a", 0), ("b", 5), ("c", 0)]:
        add(s, rid, priority, num_tokens=8, max_tokens=2)
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 8, "b": 8, "c": 8}
    s.update_from_output(out, fake_run(s, out))
    assert s.kv.pool.num_used_blocks == 6
    return s


def test_the_running_request_of_the_largest_priority_is_preempted_not_the_newest():
    s = fill("priority")
    assert [r.request_id for r in s.running] == ["a", "c", "b"]  # (priority, arrival) order
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "c": 1}
    assert out.finished_req_ids == {"b"}
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.waiting.peek() is b and s.stats()["num_preemptions"] == 1
    assert [r.request_id for r in s.running] == ["a", "c"]


def test_fcfs_preempts_the_newest():
    s = fill("fcfs")
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}
    assert out.finished_req_ids == {"c"}


def test_a_preempted_request_keeps_its_arrival_ahead_of_later_ones_of_its_priority():
    s = fill("priority")
    out = s.schedule()  # b preempted
    s.update_from_output(out, fake_run(s, out))  # a and c reach max_tokens 2: finished
    assert not s.running and s.kv.pool.num_used_blocks == 0
    add(s, "d", 5, num_tokens=8)
    out = s.schedule()
    assert [r.request_id for r in out.new_requests] == ["b", "d"]
    assert out.num_scheduled_tokens == {"b": 9, "d": 8}  # b recomputes its sampled token


def test_victims_in_one_step_go_from_the_end_and_never_one_already_scheduled():
    """Running [w, y, x, z] by (priority, arrival), the cache full, each needing a new
    block: w's preempts z; y takes the other block z left; x, needing one, preempts itself.
    w and y keep the tokens they were given this step."""
    s = make_scheduler(num_blocks=8)
    for rid, priority in [("z", 3), ("y", 0), ("x", 0), ("w", -1)]:
        add(s, rid, priority, num_tokens=8, max_tokens=4)
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["w", "y", "x", "z"]  # admission order
    assert [r.request_id for r in s.running] == ["w", "y", "x", "z"]
    s.update_from_output(out, fake_run(s, out))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"w": 1, "y": 1}
    assert out.finished_req_ids == {"z", "x"}
    assert [s.waiting.pop().request_id for _ in range(2)] == ["x", "z"]


def test_aborted_waiting_requests_are_dropped_at_the_head_of_the_heap():
    s = make_scheduler(max_seqs=1)
    for rid, priority in [("r1", 2), ("r2", 1), ("r3", 0), ("r4", 1)]:
        add(s, rid, priority)
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["r3"]
    s.finish_request("r2", RequestStatus.FINISHED_ABORTED)  # the heap's head next
    s.finish_request("r1", RequestStatus.FINISHED_ABORTED)  # deep in the heap
    s.finish_request("r3", RequestStatus.FINISHED_ABORTED)  # running
    assert s.stats()["num_waiting"] == 1 and s.has_unfinished()
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["r4"]  # r2 dropped on the way
    assert [r.request_id for r in s.waiting] == ["r1"] and s._num_gone == 1
    s.update_from_output(out, fake_run(s, out))  # r4 ends: r1, gone, goes with it
    assert len(s.waiting) == 0 and s._num_gone == 0 and not s.has_unfinished()


def test_aborting_every_waiting_request_empties_the_heap_at_once():
    s = make_scheduler(max_seqs=1)
    for rid, priority in [("a", 0), ("b", 3), ("c", -3)]:
        add(s, rid, priority)
    for rid in "abc":
        s.finish_request(rid, RequestStatus.FINISHED_ABORTED)
    assert len(s.waiting) == 0 and not s.has_unfinished()
    add(s, "d", 7)
    assert run_one_at_a_time(s) == ["d"]


def test_request_queue_kinds_and_an_unknown_policy():
    assert isinstance(request_queue("fcfs"), FCFSQueue)
    assert isinstance(request_queue("priority"), PriorityQueue)
    with pytest.raises(ValueError, match=r"one of \('fcfs', 'priority'\), got 'lifo'"):
        request_queue("lifo")
