"""The tokenizer helpers: the character bound that refuses over-long texts untokenized."""


def test_max_text_chars_bounds_the_characters_of_tokens(default_model_dir):
    """No text of more than max_text_chars(n) characters tokenizes to n tokens or fewer: the
    longest vocabulary string times the tokens (x3 with a normalizer)."""
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
