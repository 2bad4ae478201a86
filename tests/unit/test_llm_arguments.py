"""LLM's argument handling without a model: engine arguments, batches of prompts and
params, and the chat template call (each pinned by hand mutation)."""

import pytest

from vllm_runner.llm import apply_chat_template, engine_args, normalize_batch
from vllm_runner.sampling_params import SamplingParams

A, B = SamplingParams(max_tokens=1), SamplingParams(max_tokens=2)


def test_engine_args_name_the_model_either_way_and_refuse_two():
    assert engine_args("m", None, {}).model == "m"
    assert engine_args(None, "m", {"seed": 3}).model == "m"
    assert engine_args("m", "m", {}).model == "m"
    with pytest.raises(ValueError, match="^model='a' and model_name='b' disagree$"):
        engine_args("a", "b", {})
    with pytest.raises(ValueError, match=r"^unknown engine argument\(s\) \['max_seqs'\]; known: "):
        engine_args("m", None, {"max_seqs": 4})
    with pytest.raises(ValueError, match="^engine_process must be True or False, got 1$"):
        engine_args("m", None, {}, engine_process=1)
    engine_args("m", None, {}, engine_process=None)


def test_a_batch_and_its_params():
    ids, text, chat = [1, 2], "hi", {"prompt": "hi"}
    # one prompt of each kind is a batch of one: not its tokens, characters or keys
    for one in (ids, (1, 2), text, chat):
        assert normalize_batch(one, None, A) == ([one], [A])
    assert normalize_batch([], None, A) == ([], [])  # (no prompt: no outputs, as vLLM)
    assert normalize_batch([text, ids], B, A) == ([text, ids], [B, B])
    assert normalize_batch([text, ids], [A, B], A) == ([text, ids], [A, B])
    assert normalize_batch((p for p in [ids, text]), (B, A), A) == ([ids, text], [B, A])
    with pytest.raises(ValueError, match="^got 1 SamplingParams for 2 prompts$"):
        normalize_batch([text, ids], [A], A)
    with pytest.raises(ValueError, match="^got 3 SamplingParams for 2 prompts$"):
        normalize_batch([text, ids], [A, A, B], A)
    with pytest.raises(ValueError, match=r"a list of them \(one per prompt\), got dict$"):
        normalize_batch([text], {"max_tokens": 1}, A)


class RecordingTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, **kw):
        self.messages, self.kw = messages, kw
        return "templated"


def test_the_chat_template_call():
    tok = RecordingTokenizer()
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": None}]
    assert apply_chat_template(tok, messages, "m", template_kwargs={"x": 1}) == "templated"
    assert tok.messages == [{"role": "user", "content": "a\nb"},
                            {"role": "assistant", "content": ""}]  # fmt: skip
    assert tok.kw == dict(chat_template=None, tokenize=False, add_generation_prompt=True,
                          continue_final_message=False, tools=None, x=1)  # fmt: skip
    tools = [{"type": "function", "function": {"name": "f"}}]
    apply_chat_template(tok, messages, "m", add_generation_prompt=False,
                        continue_final_message=True, chat_template="t", tools=tools)  # fmt: skip
    assert tok.kw["continue_final_message"] and tok.kw["chat_template"] == "t"
    assert tok.kw["tools"] is tools  # as HF transformers' apply_chat_template takes them


@pytest.mark.parametrize(
    "messages, options, message",
    [
        ([{"content": "hi"}], {},
         r"^messages\[0\] must be a dict with a 'role' and its 'content'$"),
        (["hi"], {}, r"^messages\[0\] must be a dict"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], {},
         r"^messages\[0\] content part 0 has type 'text': this engine takes only text parts"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], {},
         r"^messages\[0\] content part 0 has type 'image_url'"),
        ([], {"template_kwargs": ["x"]}, r"^chat_template_kwargs must be a dict, got \['x'\]$"),
        ([], {"template_kwargs": {"tools": [], "documents": []}},
         r"own arguments \['documents', 'tools'\], got \{'tools': \[\], 'documents': \[\]\}$"),
        ([], {"template_kwargs": {"return_dict": True, "pad": "x" * 100}},
         r"\['return_dict'\], got \{'return_dict': True, 'pad': 'x{50}\.\.\.$"),
        ([], {"template_kwargs": {"tools": "x" * 67}},  # (shown whole up to 80 characters)
         r"\['tools'\], got \{'tools': 'x{67}'\}$"),
        ([], {"continue_final_message": True},
         "^continue_final_message continues the last message; it needs add_generation_prompt "
         "false, got both true$"),
    ],
)  # fmt: skip
def test_chat_template_refusals(messages, options, message):
    with pytest.raises(ValueError, match=message):
        apply_chat_template(RecordingTokenizer(), messages, "m", **options)


def test_a_model_that_cannot_chat_names_the_way_out():
    with pytest.raises(ValueError, match=r"^model 'm': .*, so it cannot chat; use generate\(\) "):
        apply_chat_template(None, [], "m")
    no_template = RecordingTokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match=r"no chat template .*: pass chat_template=\.\.\. to "
                       r"chat\(\), or use generate\(\) with a prompt"):  # fmt: skip
        apply_chat_template(no_template, [], "m")
    with pytest.raises(ValueError, match=r"defines none\): use /v1/completions with"):
        apply_chat_template(no_template, [], "m", "/v1/completions", offer_template=False)
