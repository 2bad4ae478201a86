"""HF config and tokenizer loading (local files only)."""

import json
import logging
import os

logger = logging.getLogger(__name__)


def load_hf_config(path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"cannot read the model config in {path!r}: {e}") from None


def load_tokenizer(path: str):
    """The folder's tokenizer, or None when it has none (the engine then works on ids)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        logger.warning("no usable tokenizer in %s (%s): token ids only", path, e)
        return None


def eos_token_ids(path: str, hf_config, tokenizer) -> set[int]:
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(hf_config, "eos_token_id", None))
    gen_config = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_config):
        with open(gen_config) as f:
            add(json.load(f).get("eos_token_id"))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids
