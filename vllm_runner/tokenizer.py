"""HF config and tokenizer loading (local files only)."""

import json
import logging
import os
import sys

logger = logging.getLogger(__name__)


def load_hf_config(path: str):
    from transformers import AutoConfig

    try:
        # NOTE: False, not transformers' None: None asks on stdin whether to run the code of
        # a model_type only the repository defines (auto_map), and runs it on 'y'
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        if "trust_remote_code" in str(e):
            from vllm_runner.model.registry import BY_MODEL_TYPE

            with open(os.path.join(path, "config.json")) as f:
                model_type = json.load(f).get("model_type")
            raise ValueError(
                f"the model in {path!r} is of model_type {model_type!r}, which only its "
                "repository's own code defines (auto_map); this engine never runs that code "
                f"(supported model types: {sorted(BY_MODEL_TYPE)})"
            ) from None
        raise ValueError(f"cannot read the model config in {path!r}: {e}") from None
    if getattr(config, "quantization_config", None) is None:  # an older GPTQ checkpoint?
        from vllm_runner.model.layers.gptq import quantize_config_json

        quant = quantize_config_json(path)
        if quant is not None:
            config.quantization_config = quant
    return config


# what refusing text says when load_tokenizer gave None
NO_TOKENIZER = (
    "this model has no usable tokenizer (none in its folder, or it failed to load: see the "
    "warning logged at start-up)"
)


def load_tokenizer(path: str):
    """The folder's tokenizer, or None when it has none or it fails to load (the engine then
    works on ids)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        logger.warning("no usable tokenizer in %s (%s): token ids only", path, e)
        return None


def eos_token_ids(folder: str, hf_config, tokenizer) -> set[int]:
    """The model's EOS ids: its config's, the tokenizer's and those of the
    generation_config.json in ``folder`` (the model's, or the one generation_config names)."""
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(hf_config, "eos_token_id", None))
    gen_config = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen_config):
        with open(gen_config) as f:
            add(json.load(f).get("eos_token_id"))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids


# Pieces of a fast tokenizer that never make one token of more characters than its
# vocabulary string has (NFC / NFKC may compose up to four characters into one: the margin).
_SAFE_MODELS = {"BPE", "Unigram"}
_SAFE_NORMALIZERS = {"NFC", "NFKC", "Prepend"}
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation"}


def _byte_chars() -> list[str]:
    """The byte-level alphabet: the character that spells each byte in the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [chars[b] for b in range(256)]


_BYTE_CHARS = _byte_chars()
_BYTE_OF = {c: b for b, c in enumerate(_BYTE_CHARS)}


def piece_bytes(tokenizer):
    """``tid -> bytes | None``: a token's own bytes read off its vocabulary piece (a
    byte-level piece spells one byte a character; a byte-fallback piece ``<0xNN>`` is that
    byte), or None where the piece is whole characters (its decoded text is the bytes). A
    piece of a multi-byte character decodes alone to U+FFFD; its bytes are the character's.
    An added token is its text (the decoder leaves it as it is), so None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    # NOTE: the decoder's own config: a Sequence holding ByteLevel decodes byte pieces too
    byte_level = decoder is not None and '"ByteLevel"' in decoder.__getstate__().decode()
    special = set(getattr(tokenizer, "all_special_ids", ()))
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}))

    def read(tid: int) -> bytes | None:
        piece = None if tid in special else tokenizer.convert_ids_to_tokens(tid)
        if not isinstance(piece, str):
            return None
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        if byte_level and all(c in _BYTE_OF for c in piece):
            return bytes(_BYTE_OF[c] for c in piece)
        return None

    return read


def token_bytes(tokenizer, width: int) -> list[bytes | None]:
    """Each id below ``width``: the bytes its token adds to a text (JSON mode's masks read
    them), None for special tokens (also added ones flagged special, which skip_special_tokens
    drops: Llama 3's headers) and ids past the tokenizer. A piece of whole characters is its
    UTF-8, SentencePiece's word mark a space (as in running text), an added token its text."""
    read = piece_bytes(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = set(getattr(tokenizer, "all_special_ids", ()))
    special |= {tid for tid, token in added.items() if token.special}
    size = len(tokenizer)
    out: list[bytes | None] = []
    for tid in range(width):
        if tid >= size or tid in special:
            raw = None
        elif tid in added:
            raw = added[tid].content.encode()
        else:
            raw = read(tid)
            piece = tokenizer.convert_ids_to_tokens(tid) if raw is None else None
            if isinstance(piece, str):
                raw = piece.replace("\u2581", " ").encode()
        out.append(raw)
    return out


def dropped_chars(tokenizer) -> str:
    """The ASCII characters the tokenizer makes no token of (SmolLM2: six control characters
    its byte-level vocabulary lacks): they do not count against ``max_text_chars``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return ""
    ascii_chars = (chr(b) for b in range(0x80))
    return "".join(c for c in ascii_chars if not backend.encode(c * 2, add_special_tokens=False))


def _bounded(config: dict | None, safe: set[str], parts: str) -> bool:
    """Whether a normalizer / pre-tokenizer config (maybe a Sequence) only has safe parts."""
    if config is None:
        return True
    if config.get("type") == "Sequence":
        return all(_bounded(c, safe, parts) for c in config.get(parts, []))
    kind = config.get("type")
    if kind == "Replace":  # one character for one or more: never shrinks
        return len(config.get("pattern", {}).get("String", "")) == 1 and bool(config["content"])
    if kind == "Split":  # unless it drops the matches
        return config.get("behavior") != "Removed"
    return kind in safe


def max_text_chars(tokenizer, num_tokens: int) -> int:
    """More characters than this cannot become ``num_tokens`` tokens or fewer, so a longer
    text is refused without tokenizing it (megabytes take seconds); sys.maxsize (no bound)
    for a tokenizer that may make one token of any number of characters.

    A token covers at most as many characters as its vocabulary string has: byte-level
    vocabularies spell one byte a character and every character is one byte or more;
    SentencePiece spells its space as one character. That holds unless a normalizer or
    pre-tokenizer drops characters (BERT's accent stripping, whitespace splitting), an
    unknown word becomes one token (WordPiece) or an added token swallows the whitespace
    around it (lstrip / rstrip).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return sys.maxsize
    config = json.loads(backend.to_str())
    stripping = any(
        getattr(t, "lstrip", False) or getattr(t, "rstrip", False)
        for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
    )
    # every character known (all 256 byte pieces, or a full byte-level alphabet): no run of
    # unknown characters becomes one token
    vocab = tokenizer.get_vocab()
    if config["model"].get("byte_fallback"):
        no_unknowns = all(f"<0x{b:02X}>" in vocab for b in range(256))
    else:  # every other character keeps its continuation bytes (ASCII: dropped_chars)
        byte_level = '"ByteLevel"' in json.dumps(config.get("pre_tokenizer"))
        no_unknowns = byte_level and all(_BYTE_CHARS[b] in vocab for b in range(0x80, 0xC0))
    if (
        stripping
        or not no_unknowns
        or config["model"].get("type") not in _SAFE_MODELS
        or not _bounded(config.get("normalizer"), _SAFE_NORMALIZERS, "normalizers")
        or not _bounded(config.get("pre_tokenizer"), _SAFE_PRE_TOKENIZERS, "pretokenizers")
    ):
        return sys.maxsize
    longest = max(map(len, vocab), default=1)
    margin = 1 if config.get("normalizer") is None else 4
    return margin * longest * num_tokens
