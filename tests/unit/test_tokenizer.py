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


def _byte_level(*lacking: int, **special):
    """A byte-level BPE tokenizer whose vocabulary is the 256 byte pieces, but for those of the
    ``lacking`` bytes (characters of those bytes make no token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from vllm_runner.tokenizer import _BYTE_CHARS

    pieces = [c for b, c in enumerate(_BYTE_CHARS) if b not in lacking]
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(pieces)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return _fast(backend, **special)


def test_dropped_chars_are_the_ascii_characters_without_a_piece():
    from types import SimpleNamespace

    from vllm_runner.tokenizer import dropped_chars

    assert dropped_chars(_byte_level(0x04, 0x41, 0x7F, 0xE9)) == "\x04A\x7f"
    assert dropped_chars(_byte_level()) == ""
    assert dropped_chars(SimpleNamespace()) == ""  # a slow tokenizer: nothing known dropped


def test_max_text_chars_needs_every_continuation_byte_of_a_byte_level_vocabulary():
    """A character of a byte missing from the vocabulary loses that byte's character: a
    continuation byte (0x80-0xBF) missing, a multi-byte character may become no token."""
    import sys

    from vllm_runner.tokenizer import max_text_chars

    assert max_text_chars(_byte_level(), 7) == 7
    assert max_text_chars(_byte_level(0x04), 7) == 7  # ASCII: dropped_chars counts those
    assert max_text_chars(_byte_level(0xC3), 7) == 7  # a lead byte: its continuation stays
    assert max_text_chars(_byte_level(0x80), 7) == sys.maxsize
    assert max_text_chars(_byte_level(0xBF), 7) == sys.maxsize


def _sentencepiece(normalizer=None, pre_tokenizer=None):
    """A byte-fallback SentencePiece-style tokenizer (every byte piece, '▁the', 'é')."""
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}, "▁": 257, "▁the": 258,
             "é": 259, "<0x4142>": 260}  # fmt: skip
    backend = Tokenizer(models.BPE(vocab, [], byte_fallback=True, unk_token="<unk>"))
    if normalizer is not None:
        backend.normalizer = normalizer
    if pre_tokenizer is not None:
        backend.pre_tokenizer = pre_tokenizer
    return _fast(backend, unk_token="<unk>")


def test_max_text_chars_bounds_only_normalizers_and_pre_tokenizers_that_never_drop():
    import sys
    from types import SimpleNamespace

    from tokenizers import normalizers, pre_tokenizers

    from vllm_runner.tokenizer import max_text_chars

    def bound(normalizer=None, pre_tokenizer=None) -> int:
        return max_text_chars(_sentencepiece(normalizer, pre_tokenizer), 2)

    longest = len("<0x4142>")
    assert bound() == 2 * longest
    assert bound(normalizers.Replace(" ", "▁")) == 4 * 2 * longest
    assert bound(normalizers.Replace(" ", "")) == sys.maxsize  # deletes every space
    assert bound(normalizers.Replace("  ", "▁")) == sys.maxsize  # two characters for one
    assert bound(normalizers.NFKC()) == 4 * 2 * longest
    assert bound(normalizers.Lowercase()) == sys.maxsize  # not known to keep the length
    one_unsafe = normalizers.Sequence([normalizers.NFC(), normalizers.StripAccents()])
    assert bound(one_unsafe) == sys.maxsize  # each part of a Sequence must be safe
    split = pre_tokenizers.Split(" ", behavior="isolated")
    assert bound(pre_tokenizer=split) == 2 * longest
    assert bound(pre_tokenizer=pre_tokenizers.Split(" ", behavior="removed")) == sys.maxsize
    assert bound(pre_tokenizer=pre_tokenizers.Whitespace()) == sys.maxsize  # drops spaces
    digits = pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.Punctuation()])
    assert bound(pre_tokenizer=digits) == 2 * longest
    assert max_text_chars(SimpleNamespace(), 3) == sys.maxsize  # a slow tokenizer


def test_max_text_chars_has_no_bound_for_wordpiece():
    """WordPiece makes an unknown word one token, however long, even with every byte-level
    character in its vocabulary."""
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers

    from vllm_runner.tokenizer import _BYTE_CHARS, max_text_chars

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(_BYTE_CHARS)}}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = _fast(backend, unk_token="[UNK]")
    assert tokenizer.encode("a" * 500, add_special_tokens=False) == [0]
    assert max_text_chars(tokenizer, 1) == sys.maxsize


def test_piece_bytes_reads_byte_pieces_and_leaves_whole_characters_to_the_text():
    """``<0xNN>`` is that byte; a byte-level piece spells its bytes; a SentencePiece piece of
    whole characters ('é', '<0x4142>') and special tokens: None (their text's bytes)."""
    from vllm_runner.tokenizer import piece_bytes

    fallback = _sentencepiece()
    read = piece_bytes(fallback)
    assert [read(fallback.convert_tokens_to_ids(p)) for p in ("<0xE9>", "<0x0A>")] == [
        b"\xe9",
        b"\n",
    ]
    for piece in ("é", "▁the", "<0x4142>", "<unk>"):
        assert read(fallback.convert_tokens_to_ids(piece)) is None, piece

    from vllm_runner.tokenizer import _BYTE_CHARS

    byte_level = _byte_level(eos_token=_BYTE_CHARS[0x41])  # 'A' as its (special) EOS
    read = piece_bytes(byte_level)
    assert read(byte_level.convert_tokens_to_ids(_BYTE_CHARS[0xE9])) == b"\xe9"
    assert read(byte_level.convert_tokens_to_ids(_BYTE_CHARS[0x20])) == b" "
    assert read(byte_level.eos_token_id) is None


# ---- config, tokenizer and EOS ids of a folder -------------------------------------------------
def test_an_unreadable_config_is_named_with_its_folder(tmp_path):
    import pytest

    from vllm_runner.tokenizer import load_hf_config

    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError) as error:
        load_hf_config(str(tmp_path))
    assert str(error.value).startswith(f"cannot read the model config in {str(tmp_path)!r}: ")


def test_a_folder_with_only_vocab_json_and_merges_has_a_tokenizer(tmp_path):
    """OPT's hub repos (facebook/opt-*) ship vocab.json + merges.txt, no tokenizer.json; a
    folder with none of the tokenizer files has no tokenizer (token ids only)."""
    import json

    from tokenizers import pre_tokenizers

    from vllm_runner.tokenizer import load_tokenizer

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    assert load_tokenizer(str(tmp_path)) is None
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    (tmp_path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(alphabet)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    ids = load_tokenizer(str(tmp_path)).encode("hi there", add_special_tokens=False)
    assert ids == [alphabet.index(c) for c in "hiĠthere"]  # 'Ġ': the byte-level space


def test_eos_ids_are_the_configs_the_generation_configs_and_the_tokenizers(tmp_path):
    import json
    from types import SimpleNamespace

    from vllm_runner.tokenizer import eos_token_ids

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, "x"]}))
    config, tokenizer = SimpleNamespace(eos_token_id=[3, 4, None]), SimpleNamespace(eos_token_id=9)
    assert eos_token_ids(str(tmp_path), config, tokenizer) == {2, 3, 4, 7, 9}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert eos_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=5), None) == {5, 11}
    assert eos_token_ids(str(tmp_path / "none"), SimpleNamespace(), tokenizer) == {9}


def test_max_text_chars_needs_every_byte_piece_of_a_byte_fallback_vocabulary():
    """A byte-fallback vocabulary lacking one byte piece (here a UTF-8 lead byte) makes an
    unknown token of a character of that byte: no bound."""
    import sys

    from tokenizers import Tokenizer, models

    from vllm_runner.tokenizer import max_text_chars

    def fallback(*lacking: int):
        pieces = ["<unk>", *(f"<0x{b:02X}>" for b in range(256) if b not in lacking)]
        model = models.BPE({p: i for i, p in enumerate(pieces)}, [], byte_fallback=True,
                           unk_token="<unk>")  # fmt: skip
        return _fast(Tokenizer(model), unk_token="<unk>")

    assert max_text_chars(fallback(), 3) == 6 * 3  # "<0xNN>": six characters
    assert max_text_chars(fallback(0xC3), 3) == sys.maxsize


def test_token_bytes_leave_out_every_special_token_and_spell_added_tokens_as_text():
    """JSON mode's bytes: an added token flagged special (Llama 3's header and reserved
    tokens: in the vocabulary's added tokens, not in ``all_special_ids``) is None, never
    JSON text; an added token of plain text is its text's UTF-8 (not read as byte
    characters); ids past the tokenizer are None."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from vllm_runner.tokenizer import _BYTE_CHARS, token_bytes

    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(_BYTE_CHARS)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|eot|>", special=True)])
    backend.add_special_tokens([AddedToken("<|header|>", special=True)])
    backend.add_tokens([AddedToken("ñu", special=False), AddedToken("<tool>", special=False)])
    tokenizer = _fast(backend, eos_token="<|eot|>")
    assert tokenizer.all_special_ids == [256]  # (the header token is not in it)
    pieces = token_bytes(tokenizer, 262)
    ids = tokenizer.convert_tokens_to_ids(["<|eot|>", "<|header|>", "ñu", "<tool>"])
    assert [pieces[i] for i in ids] == [None, None, "ñu".encode(), b"<tool>"]
    assert sorted(ids) == [256, 257, 258, 259] and pieces[260:] == [None, None]
    assert pieces[ord("{")] == b"{" and pieces[ord("\n")] == b"\n"


def test_token_bytes_read_a_byte_level_decoder_inside_a_sequence():
    """A byte-level vocabulary whose decoder is a Sequence holding ByteLevel: 'Ċ' is a
    newline (read as the text 'Ċ', a JSON string could take a raw newline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from vllm_runner.tokenizer import _BYTE_CHARS, token_bytes

    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(_BYTE_CHARS)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.Sequence([decoders.ByteLevel()])
    tokenizer = _fast(backend)
    assert tokenizer.decode([ord("\n")]) == "\n"
    assert token_bytes(tokenizer, 256) == [bytes([b]) for b in range(256)]
