"""EngineMetrics: gauges follow stats(), counters advance by the growth of cumulative totals."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

import vllm_runner.metrics
from vllm_runner.metrics import EngineMetrics

_names = itertools.count()
# Loading metrics.py by path skips the package __init__ (torch): worker subprocesses stay fast.
METRICS_PY = str(Path(vllm_runner.metrics.__file__))
LOAD_METRICS = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("metrics", {METRICS_PY!r})
metrics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(metrics)
"""


@pytest.fixture
def model_name() -> str:
    return f"unit-model-{next(_names)}"


def value(name: str, model: str, **labels: str) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"model_name": model, **labels})


def stats(**overrides: int) -> dict[str, int]:
    base = {
        "num_running": 0,
        "num_waiting": 0,
        "kv_blocks_total": 100,
        "kv_blocks_used": 0,
        "prefix_cache_queries": 0,
        "prefix_cache_hits": 0,
        "prompt_tokens_total": 0,
        "generation_tokens_total": 0,
        "num_preemptions": 0,
    }
    return {**base, **overrides}


def test_record_step_sets_gauges(model_name: str) -> None:
    m = EngineMetrics(model_name)
    m.record_step(stats(num_running=3, num_waiting=2, kv_blocks_used=25))
    assert value("vllm_runner_num_requests_running", model_name) == 3
    assert value("vllm_runner_num_requests_waiting", model_name) == 2
    assert value("vllm_runner_kv_blocks_used", model_name) == 25
    assert value("vllm_runner_kv_blocks_total", model_name) == 100
    assert value("vllm_runner_kv_cache_usage_perc", model_name) == pytest.approx(0.25)
    m.record_step(stats(weight_bytes_resident=7, weight_bytes_offloaded=5, kv_cache_bytes=9))
    assert value("vllm_runner_weight_bytes_resident", model_name) == 7
    assert value("vllm_runner_weight_bytes_offloaded", model_name) == 5
    assert value("vllm_runner_kv_cache_bytes", model_name) == 9
    m.record_step(stats())
    assert value("vllm_runner_num_requests_running", model_name) == 0
    assert value("vllm_runner_kv_blocks_used", model_name) == 0


def test_counters_follow_cumulative_totals(model_name: str) -> None:
    m = EngineMetrics(model_name)
    m.record_step(
        stats(
            prompt_tokens_total=10,
            generation_tokens_total=4,
            prefix_cache_queries=8,
            prefix_cache_hits=2,
            num_preemptions=1,
        )
    )
    m.record_step(
        stats(
            prompt_tokens_total=10,
            generation_tokens_total=9,
            prefix_cache_queries=16,
            prefix_cache_hits=6,
            num_preemptions=1,
        )
    )
    assert value("vllm_runner_prompt_tokens_total", model_name) == 10
    assert value("vllm_runner_generation_tokens_total", model_name) == 9
    assert value("vllm_runner_prefix_cache_queries_total", model_name) == 16
    assert value("vllm_runner_prefix_cache_hits_total", model_name) == 6
    assert value("vllm_runner_num_preemptions_total", model_name) == 1


def test_two_engines_with_one_name_add_up(model_name: str) -> None:
    a, b = EngineMetrics(model_name), EngineMetrics(model_name)
    a.record_step(stats(generation_tokens_total=5))
    b.record_step(stats(generation_tokens_total=7))
    a.record_step(stats(generation_tokens_total=6))
    assert value("vllm_runner_generation_tokens_total", model_name) == 13


def test_a_restarted_total_counts_from_zero(model_name: str) -> None:
    m = EngineMetrics(model_name)
    m.record_step(stats(generation_tokens_total=50))
    m.record_step(stats(generation_tokens_total=3))
    assert value("vllm_runner_generation_tokens_total", model_name) == 53


def test_missing_stats_keys_are_skipped(model_name: str) -> None:
    m = EngineMetrics(model_name)
    m.record_step({"num_running": 1})
    assert value("vllm_runner_num_requests_running", model_name) == 1
    assert value("vllm_runner_prompt_tokens_total", model_name) == 0


def test_totals_missing_while_not_publishing_do_not_break_the_takeover(model_name: str) -> None:
    m = EngineMetrics(model_name)
    m.record_step({"num_running": 1}, publish=False)  # (no totals in these stats)
    m.record_step(stats(generation_tokens_total=5))
    assert value("vllm_runner_generation_tokens_total", model_name) == 5


def test_no_kv_blocks_leaves_the_usage_gauge_alone(model_name: str) -> None:
    m = EngineMetrics(model_name)
    m.record_step(stats(kv_blocks_used=25))
    m.record_step(stats(kv_blocks_total=0))  # (no division by zero)
    assert value("vllm_runner_kv_cache_usage_perc", model_name) == pytest.approx(0.25)
    assert value("vllm_runner_kv_blocks_total", model_name) == 0


def test_a_completion_without_a_finish_reason_counts_as_unknown(model_name: str) -> None:
    m = EngineMetrics(model_name)
    m.record_request(ttft_s=None, itl_s=[], e2e_s=0.1, finish_reasons=[None, ""])
    assert value("vllm_runner_request_success_total", model_name, finished_reason="unknown") == 2


def test_record_request_observes_histograms(model_name: str) -> None:
    m = EngineMetrics(model_name)
    m.record_request(ttft_s=0.05, itl_s=[0.01, 0.02, 0.03], e2e_s=0.2, finish_reasons=["stop"])
    m.record_request(ttft_s=None, itl_s=[], e2e_s=0.01, finish_reasons=["abort"])
    assert value("vllm_runner_time_to_first_token_seconds_count", model_name) == 1
    assert value("vllm_runner_time_to_first_token_seconds_sum", model_name) == pytest.approx(0.05)
    assert value("vllm_runner_time_to_first_token_seconds_bucket", model_name, le="0.06") == 1
    assert value("vllm_runner_inter_token_latency_seconds_count", model_name) == 3
    assert value("vllm_runner_inter_token_latency_seconds_sum", model_name) == pytest.approx(0.06)
    assert value("vllm_runner_e2e_request_latency_seconds_count", model_name) == 2
    assert value("vllm_runner_request_success_total", model_name, finished_reason="stop") == 1
    assert value("vllm_runner_request_success_total", model_name, finished_reason="abort") == 1


def _edges(name: str, model: str) -> list[str]:
    from prometheus_client import REGISTRY

    return [
        sample.labels["le"]
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == name + "_bucket" and sample.labels.get("model_name") == model
    ]


def test_histograms_scrape_with_their_bucket_edges(model_name: str) -> None:
    m = EngineMetrics(model_name)
    m.record_request(ttft_s=0.07, itl_s=[0.012], e2e_s=0.3, finish_reasons=["stop"])
    ttft = "0.001 0.005 0.01 0.02 0.04 0.06 0.08 0.1 0.25 0.5 0.75 1.0 2.5 5.0 7.5 10.0 20.0 40.0"
    itl = "0.001 0.0025 0.005 0.01 0.015 0.02 0.025 0.03 0.04 0.05 0.075 0.1 0.15 0.2 0.3 0.4"
    e2e = "0.1 0.25 0.5 1.0 2.5 5.0 10.0 20.0 40.0 60.0 120.0 300.0 600.0"
    for name, edges in (
        ("vllm_runner_time_to_first_token_seconds", ttft + " 80.0"),
        ("vllm_runner_inter_token_latency_seconds", itl + " 0.5 0.75 1.0 2.5 5.0"),
        ("vllm_runner_e2e_request_latency_seconds", e2e),
    ):
        assert _edges(name, model_name) == [*edges.split(), "+Inf"], name
    itl_name = "vllm_runner_inter_token_latency_seconds_bucket"
    assert value(itl_name, model_name, le="0.01") == 0
    assert value(itl_name, model_name, le="0.015") == 1
    assert value("vllm_runner_e2e_request_latency_seconds_bucket", model_name, le="0.25") == 0
    assert value("vllm_runner_e2e_request_latency_seconds_bucket", model_name, le="0.5") == 1


def test_a_front_end_that_takes_over_publishing_counts_only_what_follows(
    model_name: str,
) -> None:
    """Another front end published the engine's first 40 tokens; this one, publishing from
    then on, adds only the 5 generated since (not the engine's whole total again)."""
    m = EngineMetrics(model_name)
    m.record_step(stats(generation_tokens_total=40, prompt_tokens_total=9), publish=False)
    m.record_step(stats(generation_tokens_total=45, prompt_tokens_total=9))
    assert value("vllm_runner_generation_tokens_total", model_name) == 5
    assert value("vllm_runner_prompt_tokens_total", model_name) == 0


def test_request_success_counts_each_completion(model_name: str) -> None:
    """n > 1: each completion under its own reason (vLLM counts children); the latency
    histograms observe the request once."""
    m = EngineMetrics(model_name)
    m.record_request(ttft_s=0.1, itl_s=[], e2e_s=0.3, finish_reasons=["stop", "length", "stop"])
    assert value("vllm_runner_request_success_total", model_name, finished_reason="stop") == 2
    assert value("vllm_runner_request_success_total", model_name, finished_reason="length") == 1
    assert value("vllm_runner_e2e_request_latency_seconds_count", model_name) == 1


def test_import_is_cheap_and_defers_prometheus_client() -> None:
    code = (
        LOAD_METRICS
        + """
import sys
assert "prometheus_client" not in sys.modules and "bentoml" not in sys.modules
assert not {"torch", "vllm_runner"} & set(sys.modules)
"""
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_multiprocess_mode_aggregates_workers(tmp_path: object) -> None:
    """Two worker processes write mmap files; MultiProcessCollector (BentoML's) sums them."""
    code = (
        LOAD_METRICS
        + """
import sys
m = metrics.EngineMetrics("mp-model")
n = int(sys.argv[1])
m.record_step({"num_running": n, "generation_tokens_total": 10,
               "kv_blocks_used": 25 * n, "kv_blocks_total": 100})  # fmt: skip
m.record_request(ttft_s=0.1, itl_s=[0.01], e2e_s=0.5, finish_reasons=["stop"])
"""
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for running in ("2", "3"):
        subprocess.run([sys.executable, "-c", code, running], check=True, env=env, timeout=60)
    reader = """
import sys
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
sys.stdout.write(generate_latest(registry).decode())
"""
    out = subprocess.run(
        [sys.executable, "-c", reader],
        check=True,
        env=env,
        timeout=60,
        capture_output=True,
        text=True,
    ).stdout
    assert 'vllm_runner_generation_tokens_total{model_name="mp-model"} 20.0' in out
    assert 'vllm_runner_time_to_first_token_seconds_count{model_name="mp-model"} 2.0' in out
    # livesum gauges drop processes once marked dead (BentoML: at a clean exit; the
    # service: at each /metrics, test_a_killed_worker_...); here nobody marked them dead,
    # so both workers' values are summed.
    assert 'vllm_runner_num_requests_running{model_name="mp-model"} 5.0' in out
    # the usage fraction is the fullest engine's, not a sum past 1 (0.5 + 0.75)
    assert 'vllm_runner_kv_cache_usage_perc{model_name="mp-model"} 0.75' in out


def test_a_front_end_that_stops_publishing_clears_its_gauges(model_name: str) -> None:
    """Gauges are summed over live workers: one that no longer publishes a shared engine's
    stats must not leave its last values in that sum."""
    m = EngineMetrics(model_name)
    m.record_step(stats(num_running=3, kv_blocks_used=25))
    m.record_step(stats(num_running=3, kv_blocks_used=25), publish=False)
    assert value("vllm_runner_kv_blocks_total", model_name) == 0
    assert value("vllm_runner_num_requests_running", model_name) == 0
    assert value("vllm_runner_kv_cache_usage_perc", model_name) == 0
    m.record_step(stats(kv_blocks_used=25))
    assert value("vllm_runner_kv_blocks_total", model_name) == 100


def test_a_killed_worker_leaves_no_gauges_in_metrics(client: object) -> None:
    """A worker that died without exiting cleanly (SIGKILL, OOM, a crash; BentoML marks only
    a clean exit dead) and was respawned: its last gauge values leave /metrics' live sums
    (they doubled kv_blocks_total), its counters stay."""
    import os
    import signal

    code = (
        LOAD_METRICS
        + """
import os, signal
metrics.EngineMetrics("killed-worker").record_step(
    {"kv_blocks_total": 100, "num_running": 3, "generation_tokens_total": 7}
)
os.kill(os.getpid(), signal.SIGKILL)
"""
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": os.environ["PROMETHEUS_MULTIPROC_DIR"], "PATH": "/usr/bin"}
    done = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert done.returncode == -signal.SIGKILL
    text = client.get("/metrics").text
    assert 'vllm_runner_generation_tokens_total{model_name="killed-worker"} 7.0' in text
    assert 'model_name="killed-worker"} 100.0' not in text
    assert 'vllm_runner_num_requests_running{model_name="killed-worker"}' not in text


def test_workers_that_forget_one_dead_process_at_once_both_succeed(tmp_path, monkeypatch) -> None:
    """Two workers' /metrics scrapes both find a dead process's live gauge files; the other
    removes each one just before this one does (as when their scrapes overlap): no error
    (it failed that scrape with a 500), and none of the files is left."""
    import os

    from vllm_runner.serving.live_gauges import forget_dead_processes

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    files = [tmp_path / f"gauge_{mode}_{dead.pid}.db" for mode in ("livesum", "livemax")]
    for f in files:
        f.touch()
    remove = os.remove

    def after_the_other_worker(path: str) -> None:
        remove(path)  # the other worker's scrape, first
        remove(path)

    monkeypatch.setattr(os, "remove", after_the_other_worker)
    forget_dead_processes(str(tmp_path))
    monkeypatch.undo()
    assert not any(f.exists() for f in files)
