"""Keeping Python's garbage collector out of the step loop.

On CUDA the host runs at most one step ahead of the GPU, so a long pause of the collector
becomes GPU idle time. Two sources: the ~0.5 M objects imports leave (frozen once, at the
first engine start) and, after that, everything an engine builds and keeps (modules,
compiled kernels, one record per KV block): a full, oldest-generation collection walks them
all. While requests run, full collections are deferred; the young generations still
collect every few steps, and a long busy stretch still gets a full pass every
``FULL_EVERY_STEPS`` steps, so garbage in old reference cycles stays bounded.

The youngest generation's threshold is raised while busy (``BUSY_YOUNG``): a step at 256
streams makes a few thousand short-lived containers (scheduler and stream outputs) that
reference counting frees by the next step; at Python's 700 a young collection walked them
alive about once a step, ~7% of the step's host time (host_step_probe, 2-core VM).
"""

import atexit
import contextlib
import gc
import threading

FULL_EVERY_STEPS = 4096
BUSY_YOUNG = 10_000  # the youngest generation's threshold while busy (allocations)
_NEVER = 1 << 30  # a threshold no generation count reaches


def freeze_startup_objects() -> None:
    """At the first engine start, move the objects that imports left (torch, transformers,
    triton: ~0.5 M) out of the garbage collector's reach. A full collection over them stalled
    the step loop for ~0.2 s, several times per long run; frozen, later passes scan only newer
    objects. Only once: a later freeze would also pin earlier engines (an engine in a
    reference cycle would then never free its KV cache)."""
    if getattr(freeze_startup_objects, "done", False):
        return
    freeze_startup_objects.done = True
    with contextlib.suppress(ImportError):  # CPU-only installs may lack triton: fine
        import triton  # noqa: F401  (the kernels' compiler, imported lazily otherwise)
    gc.collect()
    gc.freeze()
    # NOTE: unfrozen at exit so interpreter shutdown still frees them (triton's nanobind
    # bindings report frozen objects as leaks).
    atexit.register(gc.unfreeze)


class FullCollections:
    """Defers automatic full collections, and makes young ones rarer, while any engine of
    the process is busy (the thresholds are process-wide: the first engine to get busy saves
    them, the last to go idle puts each back, unless something else set it meanwhile)."""

    _lock = threading.RLock()
    _busy = 0
    _saved = (700, 10)  # the youngest and oldest thresholds before the first busy engine
    _busy_young = BUSY_YOUNG  # the youngest one while busy

    def __init__(self) -> None:
        self.active = False
        self.steps = 0

    def busy(self) -> None:
        """Before a step with requests to run."""
        if not self.active:
            self.active = True
            with FullCollections._lock:
                FullCollections._busy += 1
                if FullCollections._busy == 1:
                    young, middle, oldest = gc.get_threshold()
                    FullCollections._saved = (young, oldest)
                    # (0 turns automatic collection off: kept so)
                    FullCollections._busy_young = max(young, BUSY_YOUNG) if young else 0
                    gc.set_threshold(FullCollections._busy_young, middle, _NEVER)
        self.steps += 1
        if self.steps % FULL_EVERY_STEPS == 0:
            gc.collect()

    def idle(self) -> None:
        """When the engine has nothing left to run."""
        if self.active:
            self.active = False
            with FullCollections._lock:
                FullCollections._busy -= 1
                young, middle, oldest = gc.get_threshold()
                if FullCollections._busy == 0:  # each put back unless set meanwhile
                    saved_young, saved_oldest = FullCollections._saved
                    gc.set_threshold(
                        saved_young if young == FullCollections._busy_young else young,
                        middle,
                        saved_oldest if oldest == _NEVER else oldest,
                    )
