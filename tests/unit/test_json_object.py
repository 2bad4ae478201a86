"""json_object: the byte recognizer (RFC 8259's grammar, a top-level object), each step's
mask against running every token through it one by one, the cache key (a deep stack vs a
shallow one), the end tokens, and the settings it refuses."""

import copy
import math

import numpy as np
import pytest
import torch

from vllm_runner.sample import json_grammar as g
from vllm_runner.sample.json_masks import JsonMasks, JsonVocab, allowed_tokens, apply_json_object
from vllm_runner.sample.rows import SamplingRow
from vllm_runner.sampling_params import SamplingParams

VALID = [
    b"{}",
    b' {"a": 1} ',
    b'{"a":[1,-0,0.5,1e+5,2E-3,-12.25e10,0e0],"b":{"c":[[],{}]}}',
    b'{"t":true,"f":false,"n":null}',
    b'{"e":"\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u00e9\\uABCD"}',
    b'{"\xe2\x82\xac":"\xf0\x9f\x98\x80"}',  # (UTF-8 in strings)
    b'{\n\t"a" :\r\n [ 1 , 2 ] }\n',
    b"{" + b" " * g.MAX_WHITESPACE + b"}",
]
# each is no prefix of a JSON object: the first byte past the longest one that is
INVALID = [
    b"[1]",  # the top level is an object
    b'"a"',
    b'{"a":01}',
    b'{"a":1.}',
    b'{"a":.5}',
    b'{"a":1e}',
    b'{"a":-}',
    b'{"a":+1}',
    b'{"a":[}',
    b'{"a":{]}',
    b'{"a":1,}',
    b'{"a":[1,]}',
    b'{"a" 1}',
    b"{a:1}",
    b'{"a":tru}',
    b'{"a":True}',
    b'{"a":"\\x"}',
    b'{"a":"\\u12G4"}',
    b'{"a":"\x01"}',  # a control byte in a string
    b'{"a":"\x1f"}',  # (the last one)
    b'{"a":"\n"}',
    b"{}}",
    b"{},",
    b"{} {}",
    b"{}x",
    b"{" + b" " * (g.MAX_WHITESPACE + 1) + b"}",
]


@pytest.mark.parametrize("text", VALID)
def test_valid_objects_are_whole(text: bytes) -> None:
    assert g.is_json_object(text)
    assert all(g.is_json_prefix(text[:k]) for k in range(len(text) + 1))


@pytest.mark.parametrize("text", INVALID)
def test_invalid_text_leaves_json(text: bytes) -> None:
    assert not g.is_json_prefix(text) and not g.is_json_object(text)


@pytest.mark.parametrize(
    ("text", "whole"),
    [(b'{"a":1', False), (b'{"a":[1]', False), (b'{"a":"}"', False), (b"{} \n", True)],
)
def test_prefixes_are_whole_only_once_closed(text: bytes, whole: bool) -> None:
    assert g.is_json_prefix(text) and g.is_json_object(text) is whole


def test_whitespace_runs_are_capped_at_16_bytes() -> None:
    """The documented bound: a newline and 15 spaces of indentation, not 16."""
    assert g.is_json_object(b'{"a":\n' + b" " * 15 + b"1}")
    assert not g.is_json_prefix(b'{"a":\n' + b" " * 16)


def test_numbers_end_at_the_next_byte() -> None:
    cursor = g.JsonCursor()
    assert cursor.feed(b'{"a":[-0') and cursor.state == g.ZERO
    assert not copy.deepcopy(cursor).feed(b"1")  # 01
    assert cursor.feed(b".5e+7 ") and cursor.state == g.AFTER and cursor.run == 1


# A hand-made vocabulary: structure, pieces across states, brackets, escapes, a byte of a
# multi-byte character, a control byte, whitespace runs; None: special tokens (0 is EOS).
PIECES = [None, b"{", b"}", b"[", b"]", b'"', b'"a"', b'":', b": ", b",", b', "', b"1", b"0",
          b"-", b".5", b"e+", b"true", b"nul", b"l", b"\\", b"\\u", b"00e9", b" ", b"\n\n",
          b" " * 10, b"}}", b"]}", b'"}', b"abc", b'"]', b"}]}", b"\x01", None, b"\xe2",
          b"\x82\xac", b'{"', b"[[", b"},{", b"}],", b"1}", b'x":', b"{}", b"}]},",
          b"\\q"]  # fmt: skip
EOS = 0


def _brute_force(cursor: g.JsonCursor, vocab: JsonVocab) -> np.ndarray:
    allowed = np.zeros(vocab.width, bool)
    for token, piece in enumerate(vocab.pieces):
        if piece is not None and copy.deepcopy(cursor).feed(piece):
            allowed[token] = True
    return allowed


DOCS = [
    b'{"a": [1, -0.5e+10, true, null, {"b": "x\\u00e9\\n\xe2\x82\xac"}], "c": {}}',
    b'{"a":[[[{"b":[{"c":[[1]]}]}]]]}',
    b'{\n\n  "a"  :  [ ] ,  "b" :\n"" }  \n',
]


@pytest.mark.parametrize("doc", DOCS)
def test_each_steps_mask_is_every_token_that_stays_json(doc: bytes) -> None:
    vocab = JsonVocab(PIECES)
    assert vocab.depth == 4  # "}]}" closes three
    cursor = g.JsonCursor()
    for b in doc:
        want = _brute_force(cursor, vocab)
        got = allowed_tokens(vocab, cursor.key(vocab.depth))
        assert (got == want).all(), (cursor, np.flatnonzero(got != want))
        assert cursor.feed(bytes([b]))
    assert cursor.state == g.DONE


def test_the_key_holds_the_stack_as_deep_as_a_token_reads() -> None:
    """Stacks alike in their innermost ``depth`` entries share a mask (each equal to running
    every token on the whole stack); "}]}" closes a whole shallow stack but not a deeper
    one; "}]," and "}]},", the most closers, read the entry under the closed ones."""
    vocab = JsonVocab(PIECES)
    masks = JsonMasks(vocab)
    close3, comma2, comma3 = PIECES.index(b"}]}"), PIECES.index(b"}],"), PIECES.index(b"}]},")
    shallow, deep, deeper = g.JsonCursor(), g.JsonCursor(), g.JsonCursor()
    assert shallow.feed(b'{"a":[{"b":1')
    assert deep.feed(b'{"x":[{"a":[{"b":1')  # stack: {[{[{
    assert deeper.feed(b'{"y":{"x":[{"a":[{"b":1')  # stack: {{[{[{
    assert deep.key(4) == deeper.key(4) != shallow.key(4)
    for cursor in (shallow, deep, deeper):
        want = _brute_force(cursor, vocab)
        assert (masks.get(cursor).host == want).all()
    assert len(masks.masks) == 2
    assert all(masks.get(c).host[[close3, comma2]].all() for c in (shallow, deep))
    assert masks.get(deep).host[comma3] and not masks.get(shallow).host[comma3]
    end = copy.deepcopy(shallow)
    assert end.feed(b"}]}") and end.state == g.DONE
    assert deep.feed(b"}]}") and deep.state == g.AFTER and deep.stack == [g.OBJ, g.ARR]


@pytest.mark.parametrize("head", [b'{"a"', b'{"a":', b'{"a":[1,'])
def test_masks_along_a_whitespace_run_up_to_its_cap(head: bytes) -> None:
    """Every run length (a 10-space token fits up to a run of 6; ': ' writes one more; a
    token's own whitespace run starts again after its non-space bytes)."""
    vocab = JsonVocab(PIECES)
    for n in range(g.MAX_WHITESPACE + 1):
        cursor = g.JsonCursor()
        assert cursor.feed(head + b" " * n) and cursor.run == n
        got = allowed_tokens(vocab, cursor.key(vocab.depth))
        assert (got == _brute_force(cursor, vocab)).all(), n
        assert got[PIECES.index(b" " * 10)] == (n <= 6)


def test_a_token_with_more_brackets_than_the_bound_is_never_allowed() -> None:
    """Past 16 closers it would widen every key (the stack read under it), past 16 openers
    the simulated stack's bits: shorter tokens write the same bytes."""
    vocab = JsonVocab([None, b"{", b'"a":' + b"[" * 16, b"]" * 17, b"]" * 16, b"[" * 17])
    assert vocab.depth == 17 and vocab.ids.tolist() == [1, 2, 4]
    cursor = g.JsonCursor()
    assert cursor.feed(b'{"a":' + b"[" * 17)
    assert allowed_tokens(vocab, cursor.key(vocab.depth)).tolist() == [0, 1, 0, 0, 1, 0]


def test_the_mask_cache_is_bounded_least_recently_used_first() -> None:
    vocab = JsonVocab(PIECES)
    masks = JsonMasks(vocab, cache_bytes=0)  # (at least 16 keys)
    cursors = []
    for n in range(18):  # 18 keys: whitespace runs of 0 to 16, and a number
        cursor = g.JsonCursor()
        assert cursor.feed(b'{"a":' + (b" " * n if n <= g.MAX_WHITESPACE else b"1"))
        cursors.append(cursor)
    for cursor in cursors[:16]:
        masks.get(cursor)
    masks.get(cursors[0])  # used again: the least recent is now cursors[1]
    for cursor in cursors[16:]:
        masks.get(cursor)
    assert len(masks.masks) == 16
    assert cursors[0].key(4) in masks.masks
    assert cursors[1].key(4) not in masks.masks and cursors[2].key(4) not in masks.masks


def _row(output: list[int], **kwargs) -> SamplingRow:
    params = SamplingParams(**{"temperature": 0.0, "json_object": True, **kwargs})
    params.all_stop_token_ids = {EOS}
    return SamplingRow(params, [7, 7, *output], 2, None)


def _ids(text: list[bytes]) -> list[int]:
    return [PIECES.index(t) for t in text]


def test_end_tokens_only_after_the_whole_object() -> None:
    """Row 0 is inside its object, row 1 done (whitespace or EOS, or its stop token id 9,
    a ","), row 2 ended by EOS (not masked), row 3 plain."""
    masks = JsonMasks(JsonVocab(PIECES))
    rows = [
        _row(_ids([b"{", b'"a"', b": ", b"1"])),
        _row(_ids([b"{", b"}"]), stop_token_ids=[9]),
        _row([*_ids([b"{}"]), EOS]),
        SamplingRow(SamplingParams(temperature=0.0), [7], 1, None),
    ]
    logits = torch.zeros(4, len(PIECES))
    apply_json_object(logits, rows, masks)
    allowed = [set(torch.isfinite(r).nonzero()[:, 0].tolist()) for r in logits]
    assert allowed[0] == set(_ids([b"}", b",", b"0", b"1", b".5", b"e+", b" ", b"\n\n",
                                   b" " * 10, b', "', b"1}", b"00e9"]))  # fmt: skip
    assert allowed[1] == {EOS, 9, *_ids([b" ", b"\n\n", b" " * 10])}
    assert allowed[2] == allowed[3] == set(range(len(PIECES)))
    assert rows[0].json_cursor.consumed == 4 and rows[2].json_cursor.ended


def test_a_state_no_token_continues_allows_the_end_tokens() -> None:
    """A stop token id that is the only way on (here "1" after "-"): the output ends."""
    pieces = [None, b"{", b'"a":', b"-", b"1", b"}"]
    row = _row([1, 2, 3], stop_token_ids=[4])
    logits = torch.zeros(1, len(pieces))
    apply_json_object(logits, [row], JsonMasks(JsonVocab(pieces)))
    assert torch.isfinite(logits[0]).nonzero()[:, 0].tolist() == [0, 4]


def test_a_preempted_row_replays_its_output() -> None:
    masks = JsonMasks(JsonVocab(PIECES))
    tokens = _ids([b"{", b'"a"', b": ", b"[[", b"1"])
    row = _row(tokens[:2])
    masks.advance(row, {EOS})
    row.token_ids += tokens[2:]
    again = _row(tokens)  # a new runner row after a preemption: no cursor yet
    assert masks.advance(row, {EOS}) == masks.advance(again, {EOS})
    assert again.json_cursor.stack == [g.OBJ, g.ARR, g.ARR] and again.json_cursor.consumed == 5


def test_a_row_with_a_token_on_the_device_is_refused() -> None:
    row = _row([1])
    row.num_pending = 1
    with pytest.raises(RuntimeError, match="json_object: 1 tokens still on the device"):
        apply_json_object(torch.zeros(1, len(PIECES)), [row], JsonMasks(JsonVocab(PIECES)))


def test_sampling_keeps_to_json_greedy_and_hot() -> None:
    """Through the sampler: random logits, 200 draws at temperature 2, each token allowed."""
    from vllm_runner.sample.sampler import Sampler

    sampler = Sampler(torch.device("cpu"), 0)
    sampler.json_masks = JsonMasks(JsonVocab(PIECES))
    gen = torch.Generator().manual_seed(0)
    for temperature in (0.0, 2.0):
        row = _row([], temperature=temperature, seed=3) if temperature else _row([])
        text = b""
        for _ in range(200):
            logits = torch.randn(1, len(PIECES), generator=gen)
            sampled, _ = sampler.sample(logits, [row])
            token = sampled.item()
            if token == EOS:
                break
            text += PIECES[token]
            row.token_ids.append(token)
        assert g.is_json_prefix(text), text
        if token == EOS:
            assert g.is_json_object(text)


@pytest.mark.parametrize(
    ("other", "value"),
    [
        ("min_tokens", 2),
        ("ignore_eos", True),
        ("allowed_token_ids", [1]),
        ("bad_words", ["x"]),
        ("guided_choice", ["a"]),
    ],
)
def test_settings_that_could_leave_no_token_are_refused(other: str, value: object) -> None:
    # (led by the other field: a server's client may have asked JSON mode by another name)
    with pytest.raises(ValueError, match=f"^{other} cannot be combined with json_object"):
        SamplingParams(json_object=True, **{other: value})


def test_json_object_is_a_bool() -> None:
    with pytest.raises(ValueError, match="json_object must be True or False, got 1"):
        SamplingParams(json_object=1)
    assert not math.isnan(SamplingParams(json_object=True, stop=["}"]).temperature)


def test_an_end_id_past_the_logits_is_left_out() -> None:
    """An EOS id the model cannot sample (a tokenizer's id past the logits' width) ends
    nothing and is not indexed: the row is masked as with its other end tokens alone."""
    pieces = [None, b"{", b"}", b" "]
    row = _row([1, 2])
    row.params.all_stop_token_ids = {EOS, 9}
    logits = torch.zeros(1, len(pieces))
    apply_json_object(logits, [row], JsonMasks(JsonVocab(pieces)))
    assert torch.isfinite(logits[0]).nonzero()[:, 0].tolist() == [EOS, 3]


@pytest.mark.parametrize("value", [1, "true", {"on": True}])
def test_structured_outputs_json_object_must_be_true(value: object) -> None:
    from vllm_runner.serving.structured_outputs import structured_choice

    with pytest.raises(
        ValueError, match="only one choice list, regex, json schema, grammar or json_object true"
    ):
        structured_choice({"structured_outputs": {"json_object": value}})
    assert structured_choice({"structured_outputs": {"json_object": True}}) == {"json_object": True}
