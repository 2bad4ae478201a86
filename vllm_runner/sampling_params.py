"""Per-request sampling settings, with vLLM's field names."""

import functools
import json
import numbers
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from vllm_runner.sample.grammar_compile import compiled_grammar
from vllm_runner.sample.json_schema import schema_to_regex
from vllm_runner.sample.regex_dfa import compiled

MIN_TEMPERATURE = 0.01  # a smaller one above 0 is raised to it, as vLLM does
INT64_MAX = 2**63 - 1  # top_k becomes an int64 tensor


def _is_int(value: object) -> bool:
    """An int that is not a bool (``logprobs=True`` is refused, not read as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _as_int(value: object) -> object:
    """numpy's integers as Python ints (vLLM takes them); anything else as it is."""
    is_integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return int(value) if is_integral else value


@dataclass
class SamplingParams:
    """How to sample one request's completions; validated on construction."""

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: the outputs' text stays empty (token ids only), as vLLM
    logit_bias: dict[int, float] | None = None  # added to the token's logit (OpenAI's range)
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    truncate_prompt_tokens: int | None = None  # use the prompt's last k tokens (-1: max_model_len)
    bad_words: list[str] | None = None  # never generated (each as its tokens, see bad_words.py)
    guided_choice: list[str] | None = None  # the output is one of these (guided_choice.py)
    json_object: bool = False  # the output is one JSON object (sample/json_masks.py)
    guided_regex: str | None = None  # the output fully matches it (sample/regex_masks.py)
    # a JSON schema (or its JSON text): the output is one document it allows, compiled to a
    # regex (sample/json_schema.py), then as guided_regex
    guided_json: dict | str | None = None
    # the output is a whole sentence of this grammar (EBNF / GBNF, ``root`` the start:
    # sample/grammar_parse.py), then an end token (sample/grammar_masks.py)
    guided_grammar: str | None = None
    # Filled by the engine (not user settings): the model's EOS ids, and the tokenizer's one,
    # whose stop_reason is None (the others, generation_config's, name themselves, as vLLM).
    # Not arguments: given, they would be overwritten.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False, init=False)
    eos_token_id: int | None = field(default=None, repr=False, init=False)
    # Filled by the engine from ``bad_words`` (``vllm_runner.sample.bad_words``).
    bad_words_token_ids: list[tuple[int, ...]] = field(default_factory=list, repr=False, init=False)
    # Filled by the engine from ``guided_choice`` (``vllm_runner.sample.guided_choice``).
    guided_choice_token_ids: list[tuple[int, ...]] = field(
        default_factory=list, repr=False, init=False
    )
    # Set by validation: the regex the output fully matches (guided_regex's, or guided_json's
    # compiled); what the engine's regex masks follow.
    guided_pattern: str | None = field(default=None, repr=False, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name, limit in (("stop", "a string or a list of strings"),
                            ("stop_token_ids", "a list of token ids")):  # fmt: skip
            value = getattr(self, name)
            if value is not None and not isinstance(value, Iterable):
                raise ValueError(f"{name} must be {limit}, got {value!r}")
        self.stop = list(self.stop or [])
        self.stop_token_ids = [_as_int(t) for t in self.stop_token_ids or []]
        allowed = self.allowed_token_ids
        if allowed is not None:
            if isinstance(allowed, str | bytes | dict) or not isinstance(allowed, Iterable):
                raise ValueError(
                    f"allowed_token_ids must be a non-empty list of token ids, got {allowed!r}"
                )
            self.allowed_token_ids = [_as_int(t) for t in allowed]
        for name in ("bad_words", "guided_choice"):
            words = getattr(self, name)
            if words is not None:
                if isinstance(words, str | bytes | dict) or not isinstance(words, Iterable):
                    raise ValueError(f"{name} must be a list of strings, got {words!r}")
                setattr(self, name, list(words))
        if isinstance(self.logit_bias, dict):
            self.logit_bias = {_as_int(t): bias for t, bias in self.logit_bias.items()}
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is True:  # as vLLM: one (other bools are refused)
                setattr(self, name, 1)
        for name in ("n", "max_tokens", "top_k", "min_tokens", "logprobs", "prompt_logprobs",
                     "seed", "truncate_prompt_tokens"):  # fmt: skip
            setattr(self, name, _as_int(getattr(self, name)))
        if self.top_k == -1:
            self.top_k = 0
        if self.seed == -1:  # as vLLM and OpenAI's API: no seed (a random draw each request)
            self.seed = None
        self._check()
        if 0 < self.temperature < MIN_TEMPERATURE:  # (only 0 is greedy, as in vLLM)
            self.temperature = MIN_TEMPERATURE

    def _check(self) -> None:
        def bad(name: str, value: object, limit: str) -> ValueError:
            return ValueError(f"{name} must be {limit}, got {value!r}")

        for name in ("temperature", "top_p", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise bad(name, value, "a number")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "detokenize", "json_object"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):  # ("no" was true)
                raise bad(name, getattr(self, name), "True or False")
        if not _is_int(self.n) or self.n < 1:
            raise bad("n", self.n, "an integer >= 1")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "an integer >= 1")
        # (an int beyond float range too: the sampler's float32 tensor of it would fail the step)
        if not 0.0 <= self.temperature <= sys.float_info.max:
            raise bad("temperature", self.temperature, "a finite number >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "in (0, 1]")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= INT64_MAX:
            raise bad("top_k", self.top_k, f"-1, 0 (off) or in [1, {INT64_MAX}]")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", self.presence_penalty, "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", self.repetition_penalty, "in (0, 10]")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= 20):
                raise bad(name, value, "an integer in [0, 20]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", self.seed, "an integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", self.stop, "non-empty strings")
        if self.stop and not self.detokenize:  # (a request ends where its text holds one)
            raise ValueError(f"stop {self.stop!r} needs detokenize=True, got False")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise bad("stop_token_ids entry", t, "a token id (an integer >= 0)")
        k = self.truncate_prompt_tokens
        if k is not None and (not _is_int(k) or (k < 1 and k != -1)):
            raise bad("truncate_prompt_tokens", k, "-1 or an integer >= 1")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise bad("allowed_token_ids", [], "a non-empty list of token ids")
            for t in self.allowed_token_ids:
                if not _is_int(t) or t < 0:
                    raise bad("allowed_token_ids entry", t, "a token id (an integer >= 0)")
        for word in self.bad_words or ():
            if not isinstance(word, str) or not word.strip():
                raise bad("bad_words entry", word, "a string with a non-space character")
        if self.guided_choice is not None:
            self._check_guided_choice()
        if self.json_object:
            self._check_json_object()
        if self.guided_regex is not None:
            self._check_guided_regex()
            self.guided_pattern = self.guided_regex
        if self.guided_json is not None:
            self.guided_pattern = self._check_guided_json()
        if self.guided_grammar is not None:
            self._check_guided_grammar()
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", self.logit_bias, "a {token id: bias} dict")
            for token, bias in self.logit_bias.items():
                if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                    raise bad("logit_bias key", token, "a token id (an integer >= 0)")
                if not isinstance(bias, numbers.Real) or not -100.0 <= bias <= 100.0:
                    raise bad(f"logit_bias[{token}]", bias, "in [-100, 100]")

    def _check_guided_choice(self) -> None:
        choices = self.guided_choice
        if not choices or any(not isinstance(c, str) or not c for c in choices):
            raise ValueError(f"guided_choice must be a non-empty list of non-empty strings, got "
                             f"{choices!r}")  # fmt: skip
        # with any of these a step could have no token left to sample: min_tokens and
        # ignore_eos hold back the end token after a whole choice, allowed_token_ids and
        # bad_words may ban a choice's next token
        for name in ("min_tokens", "ignore_eos", "allowed_token_ids", "bad_words"):
            value = getattr(self, name)
            if value:
                raise ValueError(
                    f"guided_choice cannot be combined with {name} (got {value!r}): the output "
                    "must be able to end after a choice, with any of its tokens"
                )
        for choice in choices:
            held = next((stop for stop in self.stop if stop in choice), None)
            if held is not None:
                raise ValueError(
                    f"guided_choice entry {choice!r} holds the stop string {held!r}: the output "
                    "would end inside it"
                )

    def _check_json_object(self) -> None:
        # as guided_choice's: with any of these a step could have no token left to sample
        # (min_tokens and ignore_eos hold back the end token after the object). NOTE: stop
        # strings stay the caller's: one the JSON holds ends the output inside it. The
        # message leads with the other field: a server's client asks JSON mode by other names.
        for name in ("min_tokens", "ignore_eos", "allowed_token_ids", "bad_words",
                     "guided_choice"):  # fmt: skip
            value = getattr(self, name)
            if value:
                raise ValueError(
                    f"{name} cannot be combined with json_object (JSON mode), got {value!r}: "
                    "the output must be able to end after the object, with any of its tokens"
                )

    def _check_guided_regex(self) -> None:
        pattern = self.guided_regex
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"guided_regex must be a non-empty string (a regular expression), "
                             f"got {pattern!r}")  # fmt: skip
        # as JSON mode's (and led by the other field, as there): with any of these a step
        # could have no token left to sample, or two masks could leave none between them
        for name in ("min_tokens", "ignore_eos", "allowed_token_ids", "bad_words",
                     "guided_choice", "json_object"):  # fmt: skip
            value = getattr(self, name)
            if value:
                raise ValueError(
                    f"{name} cannot be combined with guided_regex, got {value!r}: the output "
                    "must be able to end once it matches, with any of its tokens"
                )
        compiled(pattern)  # ValueError naming what is not taken, or the limit passed

    def _check_guided_json(self) -> str:
        """The schema's regex (a ValueError naming guided_json and what is not taken)."""
        schema = self.guided_json
        text = schema if isinstance(schema, str) else None
        if text is not None:
            try:
                schema = json.loads(text)
            except (ValueError, RecursionError) as exc:  # (nesting past Python's stack)
                raise ValueError(f"guided_json: not JSON text of a schema ({exc}), got "
                                 f"{_shown(text)}") from None  # fmt: skip
        if not isinstance(schema, dict | bool):
            raise ValueError(f"guided_json must be a JSON schema (an object, or its JSON text), "
                             f"got {_shown(repr(schema))}")  # fmt: skip
        for name in ("min_tokens", "ignore_eos", "allowed_token_ids", "bad_words",
                     "guided_choice", "json_object", "guided_regex"):  # fmt: skip
            value = getattr(self, name)
            if value:
                raise ValueError(
                    f"{name} cannot be combined with guided_json, got {_shown(repr(value))}: "
                    "the output must be able to end once the document is whole, with any of "
                    "its tokens"
                )
        # (not JSON, or a dict nested past Python's stack; a SchemaError; the DFA's limits)
        try:  # (as JSON text, keys in their order: an object's properties come in it)
            return _schema_pattern(json.dumps(schema, allow_nan=False))
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"guided_json: {exc}") from None

    def _check_guided_grammar(self) -> None:
        text = self.guided_grammar
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                "guided_grammar must be a non-empty string (a grammar: rules 'name ::= ...', "
                f"root the start), got {_shown(repr(text))}"
            )
        for name in ("min_tokens", "ignore_eos", "allowed_token_ids", "bad_words",
                     "guided_choice", "json_object", "guided_regex", "guided_json"):  # fmt: skip
            value = getattr(self, name)
            if value or (name == "guided_json" and value is not None):  # (a schema {} too)
                raise ValueError(
                    f"{name} cannot be combined with guided_grammar, got {_shown(repr(value))}: "
                    "the output must be able to end once it is a whole sentence, with any of "
                    "its tokens"
                )
        compiled_grammar(text)  # ValueError naming the line and column, or the limit passed

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1  # (0 < t < 0.01 is raised)

    @property
    def reads_output(self) -> bool:
        """Whether sampling reads the output so far (under async scheduling its newest token
        may still be on the device): penalties, bad words of two or more tokens, and
        guided_choice."""
        return (
            self.has_penalties
            or any(len(ids) > 1 for ids in self.bad_words_token_ids)
            or bool(self.guided_choice_token_ids)
        )

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


@functools.lru_cache(maxsize=64)
def _schema_pattern(schema_json: str) -> str:
    """A schema's regex, checked to compile (a route builds a request's params twice; a
    server sees one schema many times)."""
    pattern = schema_to_regex(json.loads(schema_json))
    compiled(pattern)
    return pattern


def _shown(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
