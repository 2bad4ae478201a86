"""Engine metrics for Prometheus: scheduler gauges, token counters, latency histograms.

`AsyncLLM(log_stats=True)` creates one `EngineMetrics` and calls `record_step` after every
engine step and `record_request` when a request finishes. BentoML's `/metrics` serves them
next to its own, aggregated over its worker processes (prometheus_client multiprocess mode).

NOTE: prometheus_client picks its value storage (in-memory or per-process mmap files) when
it is first imported, from `PROMETHEUS_MULTIPROC_DIR`. It is therefore imported only when
the first `EngineMetrics` is built, never when this module is imported.
"""

from __future__ import annotations

import threading
from typing import Any

PREFIX = "vllm_runner_"

# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
               0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
# fmt: on

# stats() key -> counter name (without the _total suffix that prometheus_client appends)
_COUNTERS = {
    "prefix_cache_queries": "prefix_cache_queries",
    "prefix_cache_hits": "prefix_cache_hits",
    "prompt_tokens_total": "prompt_tokens",
    "generation_tokens_total": "generation_tokens",
    "num_preemptions": "num_preemptions",
}
# stats() key -> gauge name; "livesum": the service-wide value is the sum over live workers
_GAUGES = {
    "num_running": "num_requests_running",
    "num_waiting": "num_requests_waiting",
    "kv_blocks_used": "kv_blocks_used",
    "kv_blocks_total": "kv_blocks_total",
    "weight_bytes_resident": "weight_bytes_resident",
    "weight_bytes_offloaded": "weight_bytes_offloaded",
    "kv_cache_bytes": "kv_cache_bytes",
}

_lock = threading.Lock()
_families: _Families | None = None


class _Families:
    """The metric families, registered once per process (prometheus_client rejects duplicates)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        labels = ["model_name"]
        self.gauges = {
            key: Gauge(
                PREFIX + name,
                f"Engine {key} after the last step",
                labels,
                multiprocess_mode="livesum",
            )
            for key, name in _GAUGES.items()
        }
        self.kv_usage = Gauge(
            PREFIX + "kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (1 = full)",
            labels,
            multiprocess_mode="livemax",
        )
        self.counters = {
            key: Counter(PREFIX + name, f"Engine {key}, cumulative", labels)
            for key, name in _COUNTERS.items()
        }
        self.requests = Counter(
            PREFIX + "request_success", "Finished requests", [*labels, "finished_reason"]
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            labels,
            buckets=TTFT_BUCKETS,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive generated tokens",
            labels,
            buckets=ITL_BUCKETS,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from arrival to the end of the request",
            labels,
            buckets=E2E_BUCKETS,
        )


def _get_families() -> _Families:
    global _families
    with _lock:
        if _families is None:
            _families = _Families()
        return _families


class EngineMetrics:
    """Prometheus metrics of one engine, labelled with its model name."""

    def __init__(self, model_name: str) -> None:
        fam = _get_families()
        self.model_name = model_name
        self._gauges = {key: g.labels(model_name) for key, g in fam.gauges.items()}
        self._kv_usage = fam.kv_usage.labels(model_name)
        self._counters = {key: c.labels(model_name) for key, c in fam.counters.items()}
        self._requests = fam.requests
        self._ttft = fam.ttft.labels(model_name)
        self._itl = fam.itl.labels(model_name)
        self._e2e = fam.e2e.labels(model_name)
        # NOTE: stats() reports cumulative totals; counters advance by the difference.
        self._last: dict[str, float] = {}
        self._publishing = False  # this process's gauges hold the engine's values

    def record_step(self, stats: dict[str, Any], publish: bool = True) -> None:
        """Set the gauges from `stats` and advance counters from its cumulative totals.
        ``publish`` False (an engine another front end publishes): only note the totals, so
        that this one takes over from there if it becomes the publisher."""
        if not publish:
            self._last.update({k: stats[k] for k in self._counters if stats.get(k) is not None})
            if self._publishing:  # another front end publishes now: its gauges count
                for gauge in (*self._gauges.values(), self._kv_usage):
                    gauge.set(0)
                self._publishing = False
            return
        self._publishing = True
        for key, gauge in self._gauges.items():
            if stats.get(key) is not None:
                gauge.set(stats[key])
        used, total = stats.get("kv_blocks_used"), stats.get("kv_blocks_total")
        if used is not None and total:
            self._kv_usage.set(used / total)
        for key, counter in self._counters.items():
            value = stats.get(key)
            if value is None:
                continue
            last = self._last.get(key, 0)
            # A total below the last one means the engine restarted its count.
            delta = value - last if value >= last else value
            if delta > 0:
                counter.inc(delta)
            self._last[key] = value

    def record_request(
        self,
        *,
        ttft_s: float | None,
        itl_s: list[float],
        e2e_s: float,
        finish_reasons: list[str],
    ) -> None:
        """Observe one finished request's latencies and count each of its completions by
        finish reason."""
        if ttft_s is not None:
            self._ttft.observe(ttft_s)
        for gap in itl_s:
            self._itl.observe(gap)
        self._e2e.observe(e2e_s)
        for reason in finish_reasons:
            self._requests.labels(self.model_name, reason or "unknown").inc()
