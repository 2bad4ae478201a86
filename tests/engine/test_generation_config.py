"""The model's sampling defaults (generation_config.json, as vLLM's generation_config="auto")
for LLM / AsyncLLM requests given no SamplingParams."""

import asyncio
import json
import logging
import os

import pytest
from engine_testing import make_llm

from vllm_runner import AsyncLLM, SamplingParams

# a Qwen2.5-like file: sampling fields, do_sample (not read) and EOS ids (read as before)
SAMPLING = {"temperature": 0.0, "top_p": 0.8, "top_k": 20, "min_p": 0.05,
            "repetition_penalty": 1.05, "max_new_tokens": 5}  # fmt: skip
MODEL_DEFAULTS = SamplingParams(
    temperature=0.0, top_p=0.8, top_k=20, min_p=0.05, repetition_penalty=1.05, max_tokens=5
)


def with_generation_config(source: str, folder, config: object) -> str:
    """``source``'s files linked into ``folder``, with ``config`` as its generation_config.json
    (a str: the file's text as it is)."""
    folder.mkdir()
    for name in os.listdir(source):
        if name != "generation_config.json":
            os.symlink(os.path.join(source, name), folder / name)
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "generation_config.json").write_text(text)
    return str(folder)


@pytest.fixture(scope="module")
def defaults_dir(llama_dir, tmp_path_factory) -> str:
    config = {**SAMPLING, "do_sample": True, "eos_token_id": [2], "bos_token_id": 1}
    return with_generation_config(llama_dir, tmp_path_factory.mktemp("m") / "model", config)


def test_llm_uses_the_models_sampling_defaults_when_given_no_params(defaults_dir, caplog):
    """As vLLM's LLM: get_default_sampling_params() holds generation_config.json's sampling
    fields (max_new_tokens as max_tokens; do_sample not read), and generate() given none
    uses them (it used SamplingParams(): 16 tokens, temperature 1). Logged once at start-up."""
    with caplog.at_level(logging.INFO, logger="vllm_runner"):
        llm = make_llm(defaults_dir)
    logged = [r.getMessage() for r in caplog.records if "generation_config.json" in r.message]
    assert len(logged) == 1 and "temperature=0.0" in logged[0] and "max_tokens=5" in logged[0]
    assert llm.get_default_sampling_params() == MODEL_DEFAULTS
    prompts = [[1, 2, 3], [5, 6, 7, 8]]
    want = [o.token_ids for o in llm.generate(prompts, MODEL_DEFAULTS)]
    assert [o.token_ids for o in llm.generate(prompts)] == want
    assert all(0 < len(ids) <= 5 for ids in want)
    # an explicit SamplingParams is used as given, the built-in defaults included
    explicit = SamplingParams(ignore_eos=True, seed=0)
    assert len(llm.generate(prompts, explicit)[0].token_ids) == 16


def test_generation_config_vllm_uses_the_engines_own_defaults(defaults_dir, caplog):
    with caplog.at_level(logging.INFO, logger="vllm_runner"):
        llm = make_llm(defaults_dir, generation_config="vllm")
    assert not [r for r in caplog.records if "sampling defaults" in r.message]
    assert llm.get_default_sampling_params() == SamplingParams()


def test_a_model_without_sampling_fields_keeps_the_built_in_defaults(smol_llm, llama_dir):
    """The default model (SmolLM2 from GGUF: its generation_config.json has EOS ids only)
    and a folder without the file behave as before."""
    assert smol_llm.get_default_sampling_params() == SamplingParams()
    assert make_llm(llama_dir).get_default_sampling_params() == SamplingParams()


def test_chat_uses_the_models_sampling_defaults(default_model_dir, tmp_path):
    folder = with_generation_config(default_model_dir, tmp_path / "smol", SAMPLING)
    llm = make_llm(folder, max_model_len=256)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    (out,) = llm.chat(messages)
    assert out.token_ids == llm.chat(messages, MODEL_DEFAULTS)[0].token_ids
    assert len(out.token_ids) == 5  # (16 before, unless EOS first)


@pytest.mark.parametrize("engine_process", [False, True])
def test_async_llm_uses_the_models_sampling_defaults(defaults_dir, engine_process):
    """AsyncLLM's generate and stream given no params use them, with the engine in a thread
    or in a process of its own (whose front end learns them from the engine's limits)."""
    llm = AsyncLLM(defaults_dir, dtype="float32", device="cpu", cpu_kv_cache_gb=0.05,
                   engine_process=engine_process)  # fmt: skip

    async def main():
        try:
            want = await llm.generate([[1, 2, 3]], MODEL_DEFAULTS)
            got = await llm.generate([[1, 2, 3]])
            streamed = [o async for o in llm.stream([1, 2, 3])]
            return want[0], got[0], streamed
        finally:
            await llm.shutdown()

    assert llm.get_default_sampling_params() == MODEL_DEFAULTS
    want, got, streamed = asyncio.run(main())
    assert got.token_ids == want.token_ids and 0 < len(want.token_ids) <= 5
    assert [t for o in streamed for t in o.new_token_ids] == want.token_ids


def _generate_and_stream(llm: AsyncLLM) -> tuple[list, list]:
    """``generate([[1, 2, 3]])`` and ``stream([1, 2])`` given no params, then shut down."""

    async def main():
        try:
            return await llm.generate([[1, 2, 3]]), [o async for o in llm.stream([1, 2])]
        finally:
            await llm.shutdown()

    return asyncio.run(main())


def test_a_default_max_tokens_past_max_model_len_is_cut_to_fit(llama_dir, tmp_path):
    """AsyncLLM refuses a prompt + max_tokens over max_model_len; the model's max_new_tokens
    (given no params) is cut to what the prompt leaves instead, as the server's routes do
    (LLM cuts every max_tokens)."""
    folder = with_generation_config(llama_dir, tmp_path / "model", {"max_new_tokens": 10_000})
    llm = AsyncLLM(folder, dtype="float32", device="cpu", max_model_len=64, num_kv_blocks=16)

    assert llm.get_default_sampling_params().max_tokens == 10_000
    assert llm.inputs.default_params([1, 2, 3]).max_tokens == 61
    (out,), streamed = _generate_and_stream(llm)
    assert 0 < len(out.token_ids) <= 61 and streamed[-1].finished
    with pytest.raises(ValueError, match="max_tokens 10000 does not fit"):
        asyncio.run(llm.generate([[1, 2, 3]], llm.get_default_sampling_params()))
    offline = make_llm(folder, max_model_len=64, num_kv_blocks=16)
    assert 0 < len(offline.generate([[1, 2, 3]])[0].token_ids) <= 61


@pytest.mark.parametrize(
    "config, match",
    [
        ({"top_p": 1.5}, r"sets top_p=1.5, .*top_p must be in \(0, 1\], got 1.5"),
        ({"max_new_tokens": 0}, r"sets max_new_tokens=0, .*max_tokens must be an integer >= 1"),
        ({"temperature": -0.5}, r"sets temperature=-0.5, .*a finite number >= 0"),
        ({"top_k": 2.5}, r"sets top_k=2.5, .*top_k must be -1, 0 \(off\) or in \[1, "),
        ({"repetition_penalty": "1.1"}, r"sets repetition_penalty='1.1', .*must be a number"),
        ("{not json", r"cannot read the model's sampling defaults in .*generation_config.json"),
        ([1, 2], r"generation_config.json must hold a JSON object, got list"),
    ],
)
def test_a_sampling_default_the_engine_cannot_use_stops_start_up(
    llama_dir, tmp_path, config, match
):
    """Named with the file, the field and the limit (every request would fail on it);
    generation_config='vllm' does not read it."""
    folder = with_generation_config(llama_dir, tmp_path / "model", config)
    with pytest.raises(ValueError, match=match) as error:
        make_llm(folder)
    assert str(tmp_path / "model" / "generation_config.json") in str(error.value)
    if isinstance(config, dict):
        assert "generation_config='vllm'" in str(error.value)
        make_llm(folder, generation_config="vllm")


def test_top_k_minus_one_is_kept_as_off_and_nulls_are_not_defaults(llama_dir, tmp_path):
    config = {"top_k": -1, "temperature": None, "max_new_tokens": None, "max_length": 20}
    llm = make_llm(with_generation_config(llama_dir, tmp_path / "model", config))
    assert llm.get_default_sampling_params() == SamplingParams(top_k=0)


@pytest.mark.parametrize("value", ["auto ", "hf", None, 1])
def test_generation_config_is_auto_vllm_or_a_folder(llama_dir, value):
    with pytest.raises(ValueError, match=f"generation_config must be 'auto' .* got {value!r}"):
        make_llm(llama_dir, generation_config=value)


def test_generation_config_may_name_a_folder_of_its_own(llama_dir, defaults_dir, tmp_path):
    """As vLLM's generation_config=<folder>: that folder's generation_config.json gives the
    defaults (a relative path as well); a folder without one is refused, naming the file."""
    llm = make_llm(llama_dir, generation_config=defaults_dir)
    assert llm.get_default_sampling_params() == MODEL_DEFAULTS
    here = os.getcwd()
    os.chdir(os.path.dirname(defaults_dir))
    try:
        llm = make_llm(llama_dir, generation_config=os.path.basename(defaults_dir))
    finally:
        os.chdir(here)
    assert llm.get_default_sampling_params() == MODEL_DEFAULTS
    with pytest.raises(ValueError, match="names a folder without a generation_config.json") as e:
        make_llm(llama_dir, generation_config=str(tmp_path))
    assert str(tmp_path / "generation_config.json") in str(e.value)


def test_a_generation_config_folder_gives_the_eos_ids_too(llama_dir, tmp_path):
    """As vLLM's generation_config=<folder>: its file's eos_token_id ends requests (e.g. a
    chat model's end-of-turn id given to a base model); it was read from the model's only."""
    params = SamplingParams(max_tokens=8, temperature=0.0)
    ids = make_llm(llama_dir).generate([[1, 2, 3]], params)[0].outputs[0].token_ids
    assert len(ids) == 8 and ids[2] not in ids[:2]
    folder = tmp_path / "gc"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids[2]]}))
    (out,) = make_llm(llama_dir, generation_config=str(folder)).generate([[1, 2, 3]], params)
    assert out.outputs[0].token_ids == ids[:3] and out.outputs[0].finish_reason == "stop"


def test_a_shared_engine_is_keyed_by_the_generation_config_folder_itself(
    llama_dir, tmp_path, monkeypatch
):
    """As the model folder: "gc" in two working directories is two folders (a front end
    connected to the engine of the other's, and ran with its defaults), "gc" and "./gc" one."""
    from vllm_runner.engine.engine_process import SharedEngine
    from vllm_runner.llm import engine_args

    def socket(folder: str) -> str:
        return SharedEngine.named(
            "gc", engine_args(llama_dir, None, {"generation_config": folder})
        ).socket

    for name in ("a", "b"):
        (tmp_path / name / "gc").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    here = socket("gc")
    assert socket("./gc") == socket(str(tmp_path / "a" / "gc")) == here
    monkeypatch.chdir(tmp_path / "b")
    assert socket("gc") != here


def test_values_equal_to_transformers_defaults_are_not_the_models(llama_dir, tmp_path):
    """A top_k of 50 (transformers' default, which a save may write out) is not applied, as
    vLLM reads the file's difference from transformers' defaults; other values are."""
    config = {"top_k": 50, "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.1}
    llm = make_llm(with_generation_config(llama_dir, tmp_path / "model", config))
    assert llm.get_default_sampling_params() == SamplingParams(repetition_penalty=1.1)


def test_a_default_max_tokens_is_checked_against_the_kv_cache_as_fitted(llama_dir, tmp_path):
    """A KV cache smaller than max_model_len: a request given no params runs with the model's
    max_new_tokens, and is checked with it (it was checked as if it could run to
    max_model_len, and refused: "lower max_tokens", which it never set)."""
    folder = with_generation_config(llama_dir, tmp_path / "model", {"max_new_tokens": 8})
    llm = AsyncLLM(folder, dtype="float32", device="cpu", max_model_len=256, num_kv_blocks=4)

    (out,), streamed = _generate_and_stream(llm)
    assert 0 < len(out.token_ids) <= 8 and streamed[-1].finished
    assert llm.inputs.default_params([1] * 50).max_tokens == 8
    # (a server's route: a request without max_tokens is checked as fitted, not to 256)
    assert llm.validate([1] * 50, SamplingParams(max_tokens=None), fit=True) == [1] * 50
    with pytest.raises(ValueError, match="prompt has 256 tokens, but max_model_len is 256"):
        llm.inputs.default_params([1] * 256)
