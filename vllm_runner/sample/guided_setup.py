"""The sampler's guided-decoding masks (JSON mode, guided_regex, guided_grammar), made at an
engine's first request that needs each: the vocabulary's bytes are read once, at the first
such request, and a pattern or grammar is compiled before its request is added (so a bad one
fails the request, not a step)."""

from vllm_runner.sample.grammar_compile import compiled_grammar
from vllm_runner.sample.grammar_masks import GrammarMasks
from vllm_runner.sample.json_masks import JsonMasks, JsonVocab
from vllm_runner.sample.regex_dfa import compiled
from vllm_runner.sample.regex_masks import RegexMasks
from vllm_runner.sample.sampler import Sampler
from vllm_runner.sample.token_masks import TokenBytes
from vllm_runner.sampling_params import SamplingParams
from vllm_runner.tokenizer import token_bytes


class GuidedSetup:
    def __init__(self, tokenizer, model) -> None:
        self.tokenizer = tokenizer
        self.model = model  # (its LM head's rows: the logits' width)
        self._pieces: list[bytes | None] | None = None  # (read at the first masked request)

    def prepare(self, sampler: Sampler, params: SamplingParams) -> None:
        if self._pieces is None:
            self._pieces = token_bytes(self.tokenizer, self.model.lm_head.vocab_size)
        if params.json_object and sampler.json_masks is None:
            sampler.json_masks = JsonMasks(JsonVocab(self._pieces))
        if params.guided_pattern:
            compiled(params.guided_pattern)  # (once per pattern in the process: its cache)
        if params.guided_grammar:
            compiled_grammar(params.guided_grammar)  # (once per text in the process)
        if sampler.regex_masks is None and (params.guided_pattern or params.guided_grammar):
            sampler.regex_masks = RegexMasks(TokenBytes(self._pieces))
        if params.guided_grammar and sampler.grammar_masks is None:  # (the regex's TokenBytes)
            sampler.grammar_masks = GrammarMasks(sampler.regex_masks.vocab)
