"""Engine text output on CPU: stop tokens and strings, min_tokens, streamed text, chat
templates, logprobs."""

import asyncio

import pytest
from engine_testing import GREEDY, make_llm, prompts

from vllm_runner import SamplingParams


def test_stop_token_ids_and_min_tokens(llama_dir):
    llm = make_llm(llama_dir)
    prompt = prompts(1, seed=2)[0]
    free = llm.generate([prompt], GREEDY)[0].token_ids
    stop_at = free[5]
    out = llm.generate(
        [prompt],
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at]),
    )[0]
    first = free.index(stop_at)
    assert out.token_ids == free[: first + 1] and out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop_at
    late = llm.generate(
        [prompt],
        SamplingParams(
            max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=[free[0]], min_tokens=3
        ),
    )[0]
    assert len(late.token_ids) >= 3 and free[0] not in late.token_ids[1:3]


def test_stop_string_excluded_from_text(smol_llm):
    params = SamplingParams(max_tokens=12, temperature=0.0)
    free = smol_llm.generate(["The capital of France is"], params)[0]
    assert free.text.startswith(" Paris.")
    out = smol_llm.generate(
        ["The capital of France is"], SamplingParams(max_tokens=12, temperature=0.0, stop=["is."])
    )[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == "is."
    out = smol_llm.generate(
        ["The capital of France is"], SamplingParams(max_tokens=12, temperature=0.0, stop=["."])
    )[0]
    assert out.text == " Paris" and out.finish_reason == "stop"


def test_stop_token_text_left_out_unless_asked(smol_llm):
    """As vLLM: the text of the token that ended the request (EOS or a stop_token_ids
    entry) is not in the output unless include_stop_str_in_output; stop_reason names it."""
    dot = smol_llm.tokenizer.convert_tokens_to_ids(".")
    prompt = ["The capital of France is"]
    out = smol_llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0,
                                                   stop_token_ids=[dot]))[0]  # fmt: skip
    assert (out.text, out.outputs[0].stop_reason) == (" Paris", dot)
    both = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[dot], stop=["."])
    out = smol_llm.generate(prompt, both)[0]
    assert (out.text, out.outputs[0].stop_reason) == (" Paris", dot)
    kept = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[dot],
                          include_stop_str_in_output=True)  # fmt: skip
    assert smol_llm.generate(prompt, kept)[0].text == " Paris."
    chat = smol_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                         SamplingParams(max_tokens=32, temperature=0.0,
                                        skip_special_tokens=False))[0]  # fmt: skip
    assert chat.text == "The capital of France is Paris." and chat.finish_reason == "stop"


def test_a_stop_token_is_the_stop_reason_even_if_its_kept_text_holds_a_stop_string(smol_llm):
    """As vLLM: a request ended by a stop token is not searched for stop strings in that
    token's text (kept by include_stop_str_in_output): the token is the stop_reason, and its
    text is not cut (a stop string inside it used to win)."""
    pa = smol_llm.tokenizer.convert_tokens_to_ids("ĠParis")
    params = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[pa],
                            stop=["ar"], include_stop_str_in_output=True)  # fmt: skip
    out = smol_llm.generate(["The capital of France is"], params)[0]
    assert (out.text, out.outputs[0].stop_reason) == (" Paris", pa)


def test_an_eos_id_of_generation_config_is_the_stop_reason(default_model_dir, tmp_path):
    """As vLLM: generation_config's EOS ids other than the tokenizer's (Llama 3.1's
    <|eom_id|>, Qwen2.5's <|endoftext|>) end a request as stop tokens do: stop_reason names
    the id (it was None, as for the tokenizer's EOS); ignore_eos ignores them."""
    import json
    import os

    from vllm_runner import LLM

    for name in os.listdir(default_model_dir):
        if name != "generation_config.json":
            os.symlink(os.path.join(default_model_dir, name), tmp_path / name)
    pa = 7042  # " Paris": greedy's first token after "The capital of France is"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, pa]}))
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", max_model_len=256, num_kv_blocks=16)
    prompt = ["The capital of France is"]
    out = llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0))[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == ([pa], "stop", pa)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    assert llm.generate(prompt, params)[0].outputs[0].finish_reason == "length"


def test_stop_strings_wait_for_min_tokens(smol_llm):
    """As vLLM: stop strings count only after min_tokens tokens, and not in their text
    (greedy gives ' Paris.' then more: ' Paris' and '.' used to end it at 1-2 tokens)."""
    prompt = ["The capital of France is"]
    free = smol_llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0))[0]
    for stop in (" Paris", "."):
        params = SamplingParams(max_tokens=8, temperature=0.0, min_tokens=5, stop=[stop])
        out = smol_llm.generate(prompt, params)[0]
        assert out.text == free.text and out.finish_reason == "length", stop


def test_the_first_stop_string_in_the_text_wins(smol_llm):
    """Two stop strings in one token's text: the output is cut at the earlier one, so no
    stop string is left in it (the first listed used to win)."""
    prompt = ["The capital of France is"]
    for stops in (["is", "ar"], ["ar", "is"]):
        params = SamplingParams(max_tokens=4, temperature=0.0, stop=stops)
        out = smol_llm.generate(prompt, params)[0]
        assert (out.text, out.outputs[0].stop_reason) == (" P", "ar"), stops


def test_streamed_text_never_shows_what_a_stop_string_removes(default_model_dir):
    """Each step's text is what its deltas gave so far: the tail held back for a possible
    stop string is not shown (it was, then vanished when the stop string completed)."""
    from vllm_runner.config import EngineArgs
    from vllm_runner.engine.core import EngineCore

    engine = EngineCore(EngineArgs(model=default_model_dir, dtype="float32", device="cpu",
                                   max_model_len=512, cpu_kv_cache_gb=0.05))  # fmt: skip
    engine.add_request("The capital of France is",
                       SamplingParams(max_tokens=8, temperature=0.0, stop=["\n\nThe"]))  # fmt: skip
    joined, texts = "", []
    while engine.has_unfinished():
        for o in engine.step():
            joined += o.delta
            texts.append(o.text)
            assert o.text == joined
    assert texts[-1] == " Paris."
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))


def test_stop_strings_without_a_tokenizer_are_refused(llama_dir):
    """A folder with no tokenizer cannot match stop strings: refused, not silently run to
    max_tokens."""
    with pytest.raises(ValueError, match=r"stop \['x'\]: stop strings need a tokenizer"):
        make_llm(llama_dir).generate([[1, 2, 3]], SamplingParams(max_tokens=5, stop=["x"]))


def test_chat_template(smol_llm):
    out = smol_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=32, temperature=0.0),
    )[0]
    assert out.text == "The capital of France is Paris." and out.finish_reason == "stop"


def test_a_chat_prompt_gets_no_bos_its_template_did_not_write(tmp_path, peaked_llama):
    """A tokenizer that adds BOS, a chat template that writes none (ChatML): the chat prompt
    is the template's tokens alone, as HF's apply_chat_template and vLLM's chat route give;
    a plain text prompt still gets its BOS."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from vllm_runner import LLM
    from vllm_runner.model.default_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    tokenizer.bos_token = "<|endoftext|>"
    path = peaked_llama(str(tmp_path), ("embed",), vocab_size=49152, hidden_size=32,
                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1)  # fmt: skip
    tokenizer.save_pretrained(path)
    llm = LLM(path, num_kv_blocks=16)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    hf = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    (chat,) = llm.chat(messages, SamplingParams(max_tokens=1))
    assert chat.prompt_token_ids == list(hf["input_ids"]) and chat.prompt_token_ids[0] != 0
    (text,) = llm.generate("The capital of France is", SamplingParams(max_tokens=1))
    assert text.prompt_token_ids[0] == 0  # BOS
    # a text that starts with BOS gets no second one
    (bos,) = llm.generate("<|endoftext|>The capital of France is", SamplingParams(max_tokens=1))
    assert bos.prompt_token_ids == text.prompt_token_ids


def test_logprobs_top_n(smol_llm):
    out = smol_llm.generate(
        ["The capital of France is"], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3)
    )[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 4
    for token, top in zip(c.token_ids, c.logprobs, strict=True):
        assert len(top) == 3 and max(top, key=top.get) == token  # greedy = top-1
        assert all(v <= 0.0 for v in top.values())
    assert c.cumulative_logprob == pytest.approx(
        sum(lp[t] for t, lp in zip(c.token_ids, c.logprobs, strict=False))
    )


def test_a_model_without_a_chat_template_is_named_and_chat_takes_one(tmp_path, peaked_llama):
    """A tokenizer without a chat template (transformers has had no default one since 4.44):
    chat is refused naming the model and the way out (it said "use generate()", on the HTTP
    route too, and named no model); ``LLM.chat(chat_template=...)`` gives one, as vLLM's."""
    from transformers import AutoTokenizer

    from vllm_runner import LLM, AsyncLLM
    from vllm_runner.model.default_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    template, tokenizer.chat_template = tokenizer.chat_template, None
    path = peaked_llama(str(tmp_path), ("embed",), vocab_size=49152, hidden_size=32,
                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1)  # fmt: skip
    tokenizer.save_pretrained(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    llm = LLM(path, num_kv_blocks=16)
    with pytest.raises(ValueError, match=rf"model '{path}' has no chat template .*chat_template="):
        llm.chat(messages)
    (chat,) = llm.chat(messages, SamplingParams(max_tokens=1), chat_template=template)
    hf = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, add_generation_prompt=True
    )
    assert chat.prompt_token_ids == list(hf["input_ids"])
    served = AsyncLLM(path, num_kv_blocks=16, engine_process=False, served_model_name="smol")
    try:  # the server's chat route: no Python advice
        with pytest.raises(ValueError, match="model 'smol' has no chat template") as e:
            served.apply_chat_template(messages)
        assert "generate()" not in str(e.value) and "completion" in str(e.value)
    finally:
        asyncio.run(served.shutdown())
