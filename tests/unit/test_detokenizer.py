"""IncrementalDetokenizer: the Rust decode it calls directly gives what transformers' decode
gives, delta by delta."""

import random

import pytest


def _deltas(detok, ids: list[int]) -> list[str]:
    out = []
    for i in ids:
        detok.add_tokens([i])
        out.append(detok.take_delta(False))
    return [*out, detok.take_delta(True)]


@pytest.mark.parametrize("skip_special", [True, False])
def test_backend_decode_streams_what_transformers_decode_streams(default_model_dir, skip_special):
    from transformers import AutoTokenizer

    from vllm_runner.engine.detokenizer import IncrementalDetokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert tokenizer.clean_up_tokenization_spaces is False  # (so the Rust decode is used)
    rng = random.Random(0)
    texts = ["Paris, the café: 日本語 🙂🙂 naïve—\n\tok", "  spaced  out ", "<|im_end|> end"]
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    sequences += [[rng.randrange(len(tokenizer)) for _ in range(40)] for _ in range(30)]
    for ids in sequences:
        prompt = [rng.randrange(len(tokenizer)) for _ in range(8)]
        fast = IncrementalDetokenizer(tokenizer, prompt, [], False, skip_special)
        slow = IncrementalDetokenizer(tokenizer, prompt, [], False, skip_special)
        assert fast._backend is not None
        slow._backend = None  # transformers' decode
        assert _deltas(fast, ids) == _deltas(slow, ids)
        assert fast.text == slow.text


def test_a_tokenizer_that_cleans_up_spaces_keeps_transformers_decode(default_model_dir):
    from transformers import AutoTokenizer

    from vllm_runner.engine.detokenizer import IncrementalDetokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    tokenizer.clean_up_tokenization_spaces = True
    assert IncrementalDetokenizer(tokenizer, [1], [], False, True)._backend is None
