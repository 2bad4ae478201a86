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


def max_text_chars(tokenizer, num_tokens: int) -> int:
    """More characters than this cannot become ``num_tokens`` tokens or fewer, so a longer
    text is refused without tokenizing it (megabytes take seconds).

    A token covers at most as many characters as its vocabulary string has: byte-level
    vocabularies spell one byte a character and every character is one byte or more;
    SentencePiece spells its space as one character. A normalizer may compose characters
    first (NFC: up to three into one), hence the margin when there is one.
    """
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    margin = 1 if backend is not None and backend.normalizer is None else 3
    return margin * longest * num_tokens
