"""Shared fixtures: tiny random HF models saved to disk, and the default model on CPU."""

import importlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# NOTE: prometheus_client reads this once, when first imported; BentoML's /metrics hangs
# without it. Set before anything imports prometheus_client (bentoml, vllm_runner.metrics).
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="vllm-runner-prom-"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "service"))  # service_testing


def _tiny_config(family: str):
    from transformers import LlamaConfig, OPTConfig, Phi3Config, Qwen2Config, Qwen3Config

    if family == "llama":
        return LlamaConfig(
            vocab_size=384,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"],
        )
    if family == "qwen2":
        return Qwen2Config(
            vocab_size=384,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            architectures=["Qwen2ForCausalLM"],
        )
    if family == "qwen3":  # head_dim 32, not hidden / heads (16), as Qwen3's own configs
        return Qwen3Config(
            vocab_size=384,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            architectures=["Qwen3ForCausalLM"],
        )
    if family == "phi3":  # fused qkv_proj / gate_up_proj in the checkpoint
        return Phi3Config(
            vocab_size=384,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,  # (Phi3Config's defaults, 32000, lie past this vocabulary)
            architectures=["Phi3ForCausalLM"],
        )
    if family == "opt":
        return OPTConfig(
            vocab_size=384,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
            architectures=["OPTForCausalLM"],
        )
    raise ValueError(family)


def build_tiny_model(family: str, path: str, seed: int = 0):
    """A random HF model of ``family`` saved as safetensors (no tokenizer) in ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(family), dtype=torch.float32)
    # Random init is near-uniform: widen the weights so greedy choices are well separated.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            elif "q_norm" in name or "k_norm" in name:  # Qwen3's: unlike weights per feature
                p.uniform_(0.5, 1.5)
    model.eval().save_pretrained(path)
    return model


def save_peaked_llama(path: str, large: tuple[str, ...], **config) -> str:
    """A random fp32 Llama of ``config`` saved to ``path`` with peaked logits: weights whose
    name holds one of ``large`` drawn with std 1.0, the others 0.1, so greedy choices are not
    near-ties that any rounding flips."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(architectures=["LlamaForCausalLM"], **config), dtype=torch.float32
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 if any(s in name for s in large) else 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def peaked_llama():
    """``save_peaked_llama``, for tests in any folder (a fixture: importing ``conftest`` by
    name finds whichever conftest was loaded last)."""
    return save_peaked_llama


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    dirs = {}
    for family in ("llama", "qwen2", "qwen3", "phi3", "opt"):
        path = str(tmp_path_factory.mktemp(family))
        build_tiny_model(family, path)
        dirs[family] = path
    return dirs


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from vllm_runner.model.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smol_llm(default_model_dir):
    from vllm_runner import LLM

    return LLM(
        default_model_dir, dtype="float32", device="cpu", max_model_len=1024, cpu_kv_cache_gb=0.25
    )


# ---- the BentoML service in-process (tests/service and tests/reliability) -------------------
@pytest.fixture(scope="session")
def service_module() -> Iterator[ModuleType]:
    """`service.py`, imported with SERVICE_ENV (settings are read at import time)."""
    from service_testing import REPO, SERVICE_ENV

    saved = {k: os.environ.get(k) for k in SERVICE_ENV}
    os.environ.update(SERVICE_ENV)
    sys.path.insert(0, str(REPO))
    try:
        module = importlib.import_module("service")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield module


@pytest.fixture(scope="session")
def client(service_module: ModuleType) -> Iterator[Any]:
    """A TestClient on the service's ASGI app, entered (startup hooks run), model loaded."""
    from service_testing import AUTH, wait_ready
    from starlette.testclient import TestClient

    with TestClient(service_module.LLMService.to_asgi(), headers=AUTH) as c:
        wait_ready(lambda: c.get("/readyz").status_code)
        yield c


@pytest.fixture(scope="session")
def engine(client: Any) -> Any:
    """The AsyncLLM of the in-process service (its methods run on the app's event loop)."""
    import bentoml

    return bentoml.get_current_service().engine
