"""ServerSettings: --arg over VLLM_RUNNER_* over defaults, typed, and named in errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_runner.serving.settings import ServerSettings


def test_defaults_leave_the_engine_its_own() -> None:
    s = ServerSettings.load({}, {})
    assert s.model is None and s.api_key is None
    assert s.engine_kwargs() == {}
    assert (s.workers, s.gpus) == (1, 0)


def test_env_then_args_take_precedence() -> None:
    env = {
        "VLLM_RUNNER_MAX_MODEL_LEN": "512",
        "VLLM_RUNNER_DTYPE": "float32",
        "VLLM_RUNNER_ENABLE_PREFIX_CACHING": "off",
        "VLLM_RUNNER_CPU_OFFLOAD_GB": "1.5",
        "VLLM_RUNNER_KV_CACHE_DTYPE": "fp8",
    }
    s = ServerSettings.load(env, {"max_model_len": "1024", "model": "/models/x"})
    assert s.max_model_len == 1024 and s.model == "/models/x"
    assert s.engine_kwargs() == {
        "dtype": "float32",
        "max_model_len": 1024,
        "enable_prefix_caching": False,
        "cpu_offload_gb": 1.5,
        "kv_cache_dtype": "fp8",
    }


def test_scheduling_policy_goes_to_the_engine() -> None:
    s = ServerSettings.load({"VLLM_RUNNER_SCHEDULING_POLICY": "priority"}, {})
    assert s.engine_kwargs() == {"scheduling_policy": "priority"}
    s = ServerSettings.load(
        {"VLLM_RUNNER_SCHEDULING_POLICY": "fcfs"}, {"scheduling_policy": "priority"}
    )
    assert s.engine_kwargs() == {"scheduling_policy": "priority"}  # (--arg over the env)


def test_generation_config_goes_to_the_engine() -> None:
    s = ServerSettings.load({"VLLM_RUNNER_GENERATION_CONFIG": "vllm"}, {})
    assert s.engine_kwargs() == {"generation_config": "vllm"}


def test_pooler_config_goes_to_the_engine_as_json() -> None:
    s = ServerSettings.load({"VLLM_RUNNER_POOLER_CONFIG": '{"pooling_type": "MEAN"}'}, {})
    assert s.engine_kwargs() == {"pooler_config": '{"pooling_type": "MEAN"}'}


def test_served_model_name_goes_to_the_engine() -> None:
    s = ServerSettings.load({"VLLM_RUNNER_SERVED_MODEL_NAME": "smol"}, {"enforce_eager": "1"})
    assert s.engine_kwargs() == {"served_model_name": "smol", "enforce_eager": True}


def test_workers_of_one_server_share_one_engine_process(monkeypatch) -> None:
    """Several workers on one GPU share an engine (one copy of the weights); the name tells
    servers and GPU sets apart. With the loop as a thread, each worker keeps its own."""
    import os

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    apart = ServerSettings.load({}, {"workers": "4", "engine_process": "1"}).engine_kwargs()
    assert apart == {"engine_process": True, "shared_engine": f"bentoml-{os.getppid()}-gpus-1"}
    own = ServerSettings.load({}, {"workers": "4", "engine_process": "0"}).engine_kwargs()
    assert own == {"engine_process": False}
    # the CPU default: the loop is a thread of each worker, so nothing is shared
    cpu = ServerSettings.load({}, {"workers": "4", "device": "cpu"}).engine_kwargs()
    assert cpu == {"device": "cpu"}
    assert ServerSettings.load({}, {"workers": "1", "engine_process": "1"}).engine_kwargs() == {
        "engine_process": True
    }


def test_arg_file_values_keep_their_types() -> None:
    s = ServerSettings.load({}, {"max_num_seqs": 8, "enable_prefix_caching": True})
    assert s.max_num_seqs == 8 and s.enable_prefix_caching is True


def test_empty_env_value_means_unset() -> None:
    assert ServerSettings.load({"VLLM_RUNNER_API_KEY": ""}, {}).api_key is None


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({}, {"max_model_len": "lots"}, "--arg max_model_len must be int, got 'lots'"),
        ({"VLLM_RUNNER_NUM_KV_BLOCKS": "1.5"}, {}, "VLLM_RUNNER_NUM_KV_BLOCKS must be int"),
        ({}, {"enable_prefix_caching": "maybe"}, "enable_prefix_caching must be bool"),
        ({}, {"max_modl_len": "5"}, "unknown --arg max_modl_len"),
        ({}, {"workers": "0"}, "workers must be >= 1, got 0"),
        ({}, {"max_batch_size": "1"}, "max_batch_size must be >= 2, got 1"),
        ({}, {"max_batch_size": "0"}, "max_batch_size must be >= 2, got 0"),  # (was ">= 1")
        # engine settings are checked at start-up, not in the loader thread (a 503 server)
        ({}, {"dtype": "float64"}, "dtype must be 'auto' or one of"),
        ({"VLLM_RUNNER_KV_CACHE_DTYPE": "int4"}, {}, "kv_cache_dtype"),
        ({"VLLM_RUNNER_SEED": str(2**64)}, {}, "seed must be an integer in"),
        ({}, {"device": "cuda:one"}, "device must be 'auto', 'cpu' or 'cuda"),
        ({}, {"generation_config": "hf"}, "generation_config must be 'auto' .* 'vllm' .* folder"),
        ({}, {"pooler_config": '{"pooling_type": "max"}'}, "pooler_config pooling_type must be"),
        (
            {},
            {"scheduling_policy": "lifo"},
            "scheduling_policy must be 'fcfs' or 'priority', got 'lifo'",
        ),
        # a combination known without a GPU query: refused before the loader thread too
        ({"VLLM_RUNNER_DEVICE": "cpu"}, {"quantization": "fp8"}, r"'fp8' needs .*device='cpu'"),
    ],
)
def test_bad_values_name_the_setting(env: dict, args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerSettings.load(env, args)


def test_the_no_stream_tracing_config_excludes_only_the_token_routes() -> None:
    """The BentoML configuration docs/serving.md shows (loadtests/no_stream_tracing.yaml)
    loads and takes the streaming routes, and only those, out of OpenTelemetry."""
    code = """
import service
service.LLMService.inject_config()
from bentoml._internal.configuration.containers import BentoMLContainer
excluded = BentoMLContainer.tracing_excluded_urls.get()
paths = ["/v1/chat/completions", "/v1/completions", "/generate", "/complete", "/score",
         "/stats", "/v1/models", "/readyz"]
print(*(int(excluded.url_disabled("http://127.0.0.1:3000" + p)) for p in paths))
"""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "BENTOML_CONFIG": str(repo / "loadtests" / "no_stream_tracing.yaml")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-8:] == ["1", "1", "1", "1", "0", "0", "0", "0"]


def test_an_unknown_env_setting_is_named_in_a_warning(caplog) -> None:
    """A misspelt VLLM_RUNNER_* variable was ignored without a word (VLLM_RUNNER_APIKEY: a
    server without its key); as vLLM does for its own, a warning names it and the setting
    meant. The engine's other variables (VLLM_RUNNER_CACHE, ...) are known."""
    env = {"VLLM_RUNNER_APIKEY": "secret", "VLLM_RUNNER_CACHE": "/c", "VLLM_RUNNER_GEMV": "0",
           "VLLM_RUNNER_PDL": "0", "VLLM_RUNNER_LOG_LEVEL": "INFO", "VLLM_RUNNER_DTYPE": "float32",
           "VLLM_RUNNER_SAMPLE_SPLIT": "0", "OTHER_APIKEY": "x"}  # fmt: skip
    with caplog.at_level("WARNING", logger="vllm_runner"):
        s = ServerSettings.load(env, {})
    assert s.api_key is None
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        "unknown environment variable VLLM_RUNNER_APIKEY (did you mean VLLM_RUNNER_API_KEY?): "
        "ignored"
    ]


def test_serve_args_bentoml_dropped_stop_start_up(tmp_path: Path) -> None:
    """`bentoml serve <bento tag> --arg api_key=...` served with no key: BentoML (1.4) hands
    a built bento's service the arguments recorded by `bentoml build` instead of the command
    line's. An `--arg` that did not arrive stops start-up, naming the variable to set."""
    argv = ["/venv/bin/bentoml", "serve", "vllm-runner:latest", "--arg", "api_key=s3cret",
            "--arg=max_model_len=512", "--port", "3001"]  # fmt: skip
    with pytest.raises(ValueError) as err:
        ServerSettings.load({}, {}, argv)
    message = str(err.value)
    assert "--arg api_key, max_model_len" in message and "s3cret" not in message
    assert "VLLM_RUNNER_API_KEY" in message and "VLLM_RUNNER_MAX_MODEL_LEN" in message
    # served from the source folder, the arguments arrive: nothing to say
    assert ServerSettings.load({}, {"api_key": "s3cret", "max_model_len": "512"}, argv).api_key
    # (not a bentoml command line: ignored)
    assert ServerSettings.load({}, {}, ["pytest", "--arg", "api_key=x"]).api_key is None
    path = tmp_path / "args.yaml"
    path.write_text("max_num_seqs: 8\n")
    with pytest.raises(ValueError, match="--arg max_num_seqs did not reach"):
        ServerSettings.load({}, {}, ["/venv/bin/bentoml", "serve", "x:y", "--arg-file", str(path)])
    assert ServerSettings.load({}, {"max_num_seqs": 8}, ["bentoml", "--arg-file", str(path)])


def test_serve_arg_given_by_both_arg_and_arg_file_is_not_read_as_dropped(tmp_path: Path) -> None:
    """A key set by --arg and by --arg-file: BentoML (1.4) keeps the one of whichever option
    came first on the command line. Whichever that was, the value arrived: start-up goes on."""
    path = tmp_path / "args.yaml"
    path.write_text("max_num_seqs: 8\n")
    cli = ["--arg", "max_num_seqs=4"]
    for argv in (["bentoml", "serve", *cli, "--arg-file", str(path)],
                 ["bentoml", "serve", "--arg-file", str(path), *cli]):  # fmt: skip
        assert ServerSettings.load({}, {"max_num_seqs": "4"}, argv).max_num_seqs == 4
        assert ServerSettings.load({}, {"max_num_seqs": 8}, argv).max_num_seqs == 8
    with pytest.raises(ValueError, match="--arg max_num_seqs did not reach"):
        ServerSettings.load({}, {"max_num_seqs": 16}, argv)
