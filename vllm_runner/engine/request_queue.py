"""The scheduler's order of requests, one class per scheduling policy: its waiting queue, and
where an admitted request joins the running list (whose last request is the one preempted
when KV blocks run out)."""

import bisect
import heapq
from collections import deque
from collections.abc import Iterator

from vllm_runner.engine.request import Request


def priority_key(request: Request) -> tuple[int, int]:
    """A request's place under the "priority" policy: lower priority first, then arrival."""
    return request.priority, request.arrival_index


class FCFSQueue:
    """Arrival order. A preempted request goes back to the front: the running list is in
    admission order too, so it came before every request still waiting."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def requeue(self, request: Request) -> None:
        """A preempted request, back in the queue."""
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def place(self, running: list[Request], request: Request) -> None:
        """Put an admitted request in the running list: the newest last."""
        running.append(request)

    def clear(self) -> None:
        self._queue.clear()

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityQueue:
    """Lowest ``priority_key`` first (a heap). A preempted request goes back with its own
    arrival, so it stays ahead of the later requests of its priority."""

    def __init__(self) -> None:
        # NOTE: arrival indices are unique: the request itself is never compared
        self._heap: list[tuple[int, int, Request]] = []

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (*priority_key(request), request))

    requeue = add

    def peek(self) -> Request:
        return self._heap[0][-1]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[-1]

    def place(self, running: list[Request], request: Request) -> None:
        """Put an admitted request at its place in the running list, which stays sorted by
        ``priority_key``: its last request (the one preempted) is the least urgent, and
        never one that the scheduling loop, which walks the list from its front, has
        already given tokens this step."""
        bisect.insort(running, request, key=priority_key)

    def clear(self) -> None:
        self._heap.clear()

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        """In heap order, not sorted."""
        return (entry[-1] for entry in self._heap)


_QUEUES = {"fcfs": FCFSQueue, "priority": PriorityQueue}


def request_queue(policy: str) -> FCFSQueue | PriorityQueue:
    """The queue of a ``SchedulerConfig.scheduling_policy``."""
    if policy not in _QUEUES:
        raise ValueError(f"scheduling_policy must be one of {tuple(_QUEUES)}, got {policy!r}")
    return _QUEUES[policy]()
