"""The tokenizer helpers: the character bound that refuses over-long texts untokenized."""


def test_max_text_chars_bounds_the_characters_of_tokens(default_model_dir):
    """No text of more than max_text_chars(n) characters tokenizes to n tokens or fewer: the
    longest vocabulary string times the tokens (x4 with a normalizer)."""
    import random

    from transformers import AutoTokenizer

    from vllm_runner.tokenizer import max_text_chars

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert tokenizer.backend_tokenizer.normalizer is None
    longest = max(len(t) for t in tokenizer.get_vocab())
    assert max_text_chars(tokenizer, 10) == 10 * longest
    rng = random.Random(0)
    vocab = list(tokenizer.get_vocab())
    texts = ["#" * 80 * 7, "\n" + " " * 400, "é" * 50, "a" * 1000, "日本語" * 30]
    texts += [tokenizer.convert_tokens_to_string(rng.sample(vocab, 40)) for _ in range(20)]
    for text in texts:
        n = len(tokenizer.encode(text, add_special_tokens=False))
        assert len(text) <= max_text_chars(tokenizer, n), text[:40]


def _fast(backend, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def test_max_text_chars_has_no_bound_where_a_token_can_swallow_characters():
    """An added token that strips the whitespace around it, a normalizer that drops
    characters (BERT's), or unknown words as one token: no character bound at all (a valid
    prompt must never be refused untokenized)."""
    import sys

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    from vllm_runner.tokenizer import max_text_chars

    def byte_level() -> Tokenizer:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_tokens(list(pre_tokenizers.ByteLevel.alphabet()))
        return backend

    plain = _fast(byte_level())
    assert max_text_chars(plain, 4) == 4 * max(len(t) for t in plain.get_vocab())
    stripping = byte_level()
    stripping.add_special_tokens([AddedToken("<|end|>", rstrip=True)])
    tokenizer = _fast(stripping)
    assert len(tokenizer.encode("<|end|>" + " " * 500, add_special_tokens=False)) == 1
    assert max_text_chars(tokenizer, 1) == sys.maxsize

    # a byte-fallback vocabulary without every byte piece: unknown runs fuse into one token
    partial = Tokenizer(models.BPE({"<unk>": 0, "<0x41>": 1}, [], byte_fallback=True,
                                   unk_token="<unk>", fuse_unk=True))  # fmt: skip
    tokenizer = _fast(partial, unk_token="<unk>")
    assert len(tokenizer.encode("日" * 100, add_special_tokens=False)) <= 2
    assert max_text_chars(tokenizer, 2) == sys.maxsize

    bert = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    bert.normalizer = normalizers.BertNormalizer(strip_accents=True)
    bert.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert max_text_chars(_fast(bert, unk_token="[UNK]"), 1) == sys.maxsize


def test_max_text_chars_bounds_a_sentencepiece_tokenizer_with_a_normalizer():
    """Llama 2 / Mistral style (byte-fallback BPE, the space replaced by '▁', prepended):
    bounded, with the normalizer's margin, and no text breaks the bound."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    from vllm_runner.tokenizer import dropped_chars, max_text_chars

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}, "▁": 257, "▁the": 258}
    backend = Tokenizer(models.BPE(vocab, [], byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback()])
    tokenizer = _fast(backend, unk_token="<unk>")
    assert max_text_chars(tokenizer, 5) == 4 * 6 * 5  # "<0xE2>": six characters
    assert dropped_chars(tokenizer) == ""  # every character becomes a byte piece at least
    for text in (" the the", "日本語 é", "x" * 50, "the" * 20):
        n = len(tokenizer.encode(text, add_special_tokens=False))
        assert len(text) <= max_text_chars(tokenizer, n), text


def test_token_bytes_rebuild_characters_split_across_tokens(default_model_dir):
    """OpenAI's chat logprobs `bytes`: a piece of a multi-byte character decodes alone to
    U+FFFD, but its bytes are the character's own, so the tokens' bytes joined are the text's
    (byte-level SmolLM2, and a byte-fallback SentencePiece-style tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import AutoTokenizer

    from vllm_runner.serving.openai_format import TokenDecoder

    smol = AutoTokenizer.from_pretrained(default_model_dir)
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}, "▁": 257, "▁the": 258}
    backend = Tokenizer(models.BPE(vocab, [], byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback()])
    fallback = _fast(backend, unk_token="<unk>")
    text = " the 🌟🌟 日本語 é"
    for tokenizer in (smol, fallback):
        ids = tokenizer.encode(text, add_special_tokens=False)
        decode = TokenDecoder(tokenizer)
        assert "\ufffd" in [decode(t) for t in ids]  # some token is part of a character
        assert b"".join(decode.bytes(t) for t in ids) == text.encode("utf-8")
    im_end = smol.convert_tokens_to_ids("<|im_end|>")  # a special token: its text's bytes
    assert TokenDecoder(smol).bytes(im_end) == b"<|im_end|>"
