"""The counts a guided_regex DFA with counted Loops carries beside its state
(``regex_subsets.py``): its counter steps as arrays, taken for many rows at once (the pass
over the vocabulary) or one (a cursor), and a count's *horizon key* for the mask cache."""

import numpy as np

from vllm_runner.sample.regex_subsets import DEAD, Subsets

_NEVER = np.iinfo(np.int32).max  # (an unbounded Loop's high; a cap that never bites)


class Counters:
    """The counter steps of one DFA. For the vectorized pass, a row's counts are a row of
    ``held`` ([rows, 1 + width] int32): column 0 always 0 (what a Loop entered starts
    from), then the state's slots, then 0s up to the most slots a state has."""

    def __init__(self, sub: Subsets) -> None:
        self.slots = sub.slots  # per state: its Loops' (low, high)
        self.steps, self.edges = sub.steps, sub.edges  # (for one row: step_one)
        self.width = max(map(len, self.slots))
        # NOTE: one step more, ``keep``: the counts as they are (a row with no step, in a pass
        # that takes every row's step at once: cheaper than picking the rows out)
        self.keep = len(sub.steps)
        keep = tuple((j, 0, None) for j in range(self.width))
        steps = [*sub.steps, ((), (len(sub.edges),))]
        all_edges = [*sub.edges, (DEAD, keep)]
        # by event, per step: its column in ``held`` (0: no such event), bounds, 3 ** event
        shape = (max(len(events) for events, _ in steps), len(steps))
        self.event_at = np.zeros(shape, np.int64)
        self.event_low = np.zeros(shape, np.int32)
        self.event_high = np.full(shape, _NEVER, np.int32)
        self.event_weight = np.zeros(shape, np.int64)
        self.first_edge = np.zeros(len(steps), np.int64)
        edges: list[int] = []
        for s, (events, step_edges) in enumerate(steps):
            for k, (slot, low, high) in enumerate(events):
                self.event_at[k, s], self.event_weight[k, s] = slot + 1, 3**k
                self.event_low[k, s] = low
                self.event_high[k, s] = _NEVER if high is None else high
            self.first_edge[s] = len(edges)
            edges += step_edges
        self.edge_of = np.array(edges, np.int64)  # a step's edges, from its first
        # by slot, per edge: the column its count comes from, plus, cap
        shape = (self.width, len(all_edges))
        self.edge_state = np.array([state for state, _ in all_edges], np.int32)
        self.edge_from = np.zeros(shape, np.int64)
        self.edge_plus = np.zeros(shape, np.int32)
        self.edge_cap = np.full(shape, _NEVER, np.int32)
        for e, (_, ops) in enumerate(all_edges):
            for j, (src, plus, cap) in enumerate(ops):
                self.edge_from[j, e], self.edge_plus[j, e] = src + 1, plus
                self.edge_cap[j, e] = _NEVER if cap is None else cap

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))

    def held(self, rows: int, counts: tuple[int, ...]) -> np.ndarray:
        """[rows, 1 + width] int32: ``rows`` rows of one state's ``counts``."""
        held = np.zeros((rows, 1 + self.width), np.int32)
        held[:, 1 : 1 + len(counts)] = counts
        return held

    def step(self, steps: np.ndarray, held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[rows] steps, their rows of ``held`` -> [rows] next states, their ``held``."""
        flat = held.ravel()  # (a row's column c at row * (1 + width) + c: 1-d takes are fast)
        base = np.arange(0, held.size, held.shape[1])
        code = self.first_edge.take(steps)
        for k in range(self.event_at.shape[0]):
            done = flat.take(base + self.event_at[k].take(steps)) + 1
            cls = (done >= self.event_low[k].take(steps)).view(np.int8)
            cls = cls + (done >= self.event_high[k].take(steps)).view(np.int8)
            code += cls * self.event_weight[k].take(steps)
        edge = self.edge_of.take(code)
        after = np.zeros_like(held)
        for j in range(self.width):
            count = flat.take(base + self.edge_from[j].take(edge)) + self.edge_plus[j].take(edge)
            after[:, 1 + j] = np.minimum(count, self.edge_cap[j].take(edge))
        return self.edge_state.take(edge), after

    def step_one(self, step: int, counts: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """``step`` for one row (the same rule on the lists it was built from)."""
        events, edges = self.steps[step]
        code = 0
        for k, (slot, low, high) in enumerate(events):
            done = counts[slot] + 1
            code += ((done >= low) + (high is not None and done >= high)) * 3**k
        state, ops = self.edges[edges[code]]
        after = []
        for src, plus, cap in ops:
            count = counts[src] + plus if src >= 0 else 0
            after.append(count if cap is None else min(count, cap))
        return state, tuple(after)

    def horizon_key(self, state: int, counts: tuple[int, ...], horizon: int) -> tuple:
        """What of the counts the next ``horizon`` bytes can tell apart: per slot, how many
        iterations from ``low`` and from ``high``, up to horizon + 1 (an iteration reads a
        byte at least). NOTE: most counts of a long Loop then share one key, and a mask."""
        far = horizon + 1
        key = []
        for (low, high), count in zip(self.slots[state], counts, strict=True):
            key.append(min(max(low - count, 0), far))
            key.append(-1 if high is None else min(high - count, far))
        return tuple(key)
