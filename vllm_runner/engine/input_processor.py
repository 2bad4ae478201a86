"""Prompts to token ids, and every check a request must pass before it reaches the engine.

It needs only the built engine's limits (``EngineLimits``, small and picklable) and the
tokenizer, so a front end whose engine core runs in another process checks requests itself,
in the caller, before sending them (``AsyncLLM``)."""

import dataclasses
import numbers
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypedDict

from vllm_runner.engine.errors import ContextLengthError
from vllm_runner.engine.sampling_defaults import fit_max_tokens
from vllm_runner.lora.peft import AdapterChecks, LoRALimits
from vllm_runner.pooling_params import PoolingParams
from vllm_runner.sample.guided_choice import choice_token_ids
from vllm_runner.sample.regex_parse import shown
from vllm_runner.sampling_params import INT64_MAX, SamplingParams
from vllm_runner.tokenizer import NO_TOKENIZER, dropped_chars, max_text_chars

_DROPPED_MAX = 4  # a text this many times over the character bound is refused whatever it holds


class TextPrompt(TypedDict):
    """vLLM's text prompt as a dict: ``{"prompt": text}``."""

    prompt: str


class TokensPrompt(TypedDict):
    """vLLM's token-id prompt as a dict: ``{"prompt_token_ids": ids}``."""

    prompt_token_ids: list[int]


def unpack_prompt(prompt: object) -> object:
    """A vLLM prompt dict's text or token ids (the ids when it has both, as vLLM); any other
    prompt as it is."""
    if not isinstance(prompt, dict):
        return prompt
    extra = sorted(map(str, set(prompt) - {"prompt", "prompt_token_ids"}))
    if extra:
        raise ValueError(
            f"prompt dict key(s) {extra} are not supported: this engine takes "
            "{'prompt': text} or {'prompt_token_ids': [...]}"
        )
    if "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if not isinstance(ids, list | tuple):
            raise ValueError(
                f"'prompt_token_ids' must be a list of token ids, got {type(ids).__name__}"
            )
        return ids
    if "prompt" not in prompt:
        raise ValueError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")
    if not isinstance(prompt["prompt"], str):
        raise ValueError(f"'prompt' must be a string, got {type(prompt['prompt']).__name__}")
    return prompt["prompt"]


def prompt_text(prompt: object) -> str | None:
    """What a RequestOutput shows as its prompt: the text given, None for token ids."""
    text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
    return text if isinstance(text, str) else None


@dataclass(frozen=True)
class EngineLimits:
    """What checking a request needs from a built engine."""

    model_path: str  # where the tokenizer loads from
    max_model_len: int
    vocab_size: int
    block_size: int
    num_blocks: int  # KV-cache blocks: a request that needs more would wait forever
    serving: bool  # online: prompt + max_tokens must fit max_model_len (offline: cut)
    # the model's SamplingParams defaults (engine/sampling_defaults.py): {field: value}
    sampling_defaults: dict[str, object] = field(default_factory=dict)
    eos_token_ids: frozenset[int] = frozenset()  # the model's (min_tokens bans them)
    scheduling_policy: str = "fcfs"  # EngineArgs': a request's priority needs "priority"
    hidden_size: int = 0  # the length of the model's pooled vectors (embeddings)
    generates: bool = True  # False: a checkpoint without an LM head, for embeddings only
    lora: LoRALimits | None = None  # enable_lora: what an adapter must fit (lora/peft.py)


class InputProcessor:
    def __init__(self, limits: EngineLimits, tokenizer) -> None:
        self.limits = limits
        self.tokenizer = tokenizer
        self.max_prompt_chars = (
            max_text_chars(tokenizer, limits.max_model_len) if tokenizer is not None else 0
        )
        self.uncounted = dropped_chars(tokenizer) if tokenizer is not None else ""
        self.loras = AdapterChecks(limits.lora)  # a request's LoRA adapter: loras.check

    def tokenize(
        self,
        prompt: str | list[int] | dict,
        chat: bool = False,
        params: SamplingParams | PoolingParams | None = None,
    ) -> list[int]:
        """``chat``: ``prompt`` is a chat template's text, which holds every special token the
        model wants (as vLLM's chat route and HF's ``apply_chat_template``: none added).
        ``prompt`` may be a vLLM prompt dict (``TextPrompt``, ``TokensPrompt``). ``params``:
        the request's, whose ``truncate_prompt_tokens`` keeps the ids' last k (as vLLM: of
        the tokenized text, BOS or chat template included), before any length check."""
        take = isinstance(params, SamplingParams | PoolingParams)
        k = params.truncate_prompt_tokens if take else None
        if k is None:
            return self._tokenize(prompt, chat)
        max_len = self.limits.max_model_len
        if k > max_len:
            raise ValueError(
                f"truncate_prompt_tokens {k} is more than max_model_len ({max_len}): "
                "choose a smaller one, or -1 for max_model_len"
            )
        # NOTE: a text cut to its last k ids may be of any length (vLLM tokenizes it whole)
        ids = self._tokenize(prompt, chat, bounded=False)
        return ids[-(max_len if k == -1 else k) :]

    def _tokenize(
        self, prompt: str | list[int] | dict, chat: bool, bounded: bool = True
    ) -> list[int]:
        """``bounded``: refuse a text too long for max_model_len before tokenizing it."""
        prompt = unpack_prompt(prompt)
        if isinstance(prompt, str):
            if not prompt and self.tokenizer is None:
                raise ValueError("prompt is empty: give at least one character or token id")
            if self.tokenizer is None:
                raise ValueError(f"{NO_TOKENIZER}: pass token ids, not text")
            if bounded:
                self.check_text_length(prompt, "prompt")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in JSON)
                raise ValueError(
                    f"prompt is not valid Unicode text: {e.reason} at character {e.start}"
                ) from None
            # NOTE: a text that already starts with BOS gets no second one
            bos = self.tokenizer.bos_token
            special = not chat and not (bos and prompt.startswith(bos))
            ids = self.tokenizer.encode(prompt, add_special_tokens=special)
            if not ids and not prompt:  # (as vLLM: an empty text is the BOS it may add)
                raise ValueError("prompt is empty: give at least one character or token id")
            return ids
        if not isinstance(prompt, list | tuple):
            raise ValueError(
                f"prompt must be a string or a list of token ids, got {type(prompt).__name__}"
            )
        for t in prompt:  # a bool is not read as 0 / 1
            if not isinstance(t, int) or isinstance(t, bool):
                raise ValueError(f"prompt token id {t!r} is not an integer")
        return list(prompt)

    def check_text_length(self, text: str, what: str) -> None:
        """Refuse a text too long for max_model_len before tokenizing it (which would hold
        the caller, e.g. a server's event loop, for seconds)."""
        length = len(text)
        # characters the tokenizer drops do not count, up to a limit: tokenizing them is work
        if self.max_prompt_chars < length <= _DROPPED_MAX * self.max_prompt_chars:
            length -= sum(text.count(c) for c in self.uncounted)
        if length > self.max_prompt_chars:
            raise ContextLengthError(
                f"{what} has {len(text)} characters, more than max_model_len "
                f"({self.limits.max_model_len}) tokens can hold: at most {self.max_prompt_chars}",
                self.limits.max_model_len,
            )

    def validate(
        self, prompt_ids: list[int], params: SamplingParams | PoolingParams, lora: object = None
    ) -> None:
        """``lora``: the request's LoRARequest, if any."""
        limits = self.limits
        if lora is not None:
            self.loras.check(lora)
        if not prompt_ids:
            raise ValueError("prompt is empty: it has 0 tokens")
        if isinstance(params, PoolingParams):
            return self._validate_pooling(prompt_ids, params)
        if not limits.generates:
            raise ValueError(
                f"model {limits.model_path!r} has no LM head (its checkpoint holds no "
                "lm_head.weight): it serves embeddings only, not generation"
            )
        # NOTE: offline, as vLLM's LLM, a prompt of max_model_len tokens gets one new token
        # (whose KV is never written); a server's request must leave room for max_tokens.
        if len(prompt_ids) >= limits.max_model_len + (not limits.serving):
            room = "prompt + at least one new token must fit"
            if not limits.serving:
                room = "a prompt may have that many tokens at most"
            raise ContextLengthError(
                f"prompt has {len(prompt_ids)} tokens, but max_model_len is "
                f"{limits.max_model_len} ({room})",
                limits.max_model_len,
            )
        self._check_in_vocab("prompt token id", prompt_ids)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        wanted = len(prompt_ids) + (params.max_tokens or 0)
        if limits.serving and params.max_tokens and wanted > limits.max_model_len:
            raise ContextLengthError(
                f"max_tokens {params.max_tokens} does not fit: max_model_len is "
                f"{limits.max_model_len} tokens, but {wanted} were requested ({len(prompt_ids)} "
                "in the prompt): shorten the prompt or lower max_tokens",
                limits.max_model_len,
            )
        # A request the whole KV cache cannot hold would wait forever (and hold up the queue).
        new = self.max_new_tokens(len(prompt_ids), params)
        blocks = -(-(len(prompt_ids) + new - 1) // limits.block_size)  # the last token: no KV
        if blocks > limits.num_blocks:
            raise ValueError(
                f"the request needs up to {blocks} KV-cache blocks of {limits.block_size} "
                f"tokens ({len(prompt_ids)} prompt + {new} new tokens), but the cache has "
                f"{limits.num_blocks}: lower max_tokens or give the KV cache more memory"
            )
        if params.bad_words and self.tokenizer is None:
            raise ValueError(f"bad_words {params.bad_words!r} need a tokenizer and {NO_TOKENIZER}")
        if params.guided_choice:
            self._check_guided_choice(params)
        if params.json_object:
            self._check_masked("json_object", "the object", params)
        if params.guided_regex:
            self._check_masked(f"guided_regex {shown(params.guided_regex)}", "a match", params)
        if params.guided_json is not None:
            self._check_masked("guided_json", "the document", params)
        if params.guided_grammar:
            self._check_masked("guided_grammar", "a whole sentence", params)
        if params.stop and self.tokenizer is None:
            raise ValueError(
                f"stop {params.stop!r}: stop strings need a tokenizer and {NO_TOKENIZER}; "
                "use stop_token_ids"
            )
        self._check_in_vocab("logit_bias token id", params.logit_bias or ())
        self._check_in_vocab("stop_token_ids entry", params.stop_token_ids)
        self._check_in_vocab("allowed_token_ids entry", params.allowed_token_ids or ())
        self._check_allowed_not_all_banned(params)

    def _validate_pooling(self, prompt_ids: list[int], params: PoolingParams) -> None:
        """An embedding request computes its prompt only: up to max_model_len tokens."""
        limits = self.limits
        if len(prompt_ids) > limits.max_model_len:
            raise ContextLengthError(
                f"prompt has {len(prompt_ids)} tokens, but max_model_len is "
                f"{limits.max_model_len} (an embedding's prompt may have that many at most)",
                limits.max_model_len,
            )
        self._check_in_vocab("prompt token id", prompt_ids)
        self.check_dimensions(params)
        blocks = -(-len(prompt_ids) // limits.block_size)
        if blocks > limits.num_blocks:
            raise ValueError(
                f"the request needs {blocks} KV-cache blocks of {limits.block_size} tokens "
                f"({len(prompt_ids)} prompt tokens), but the cache has {limits.num_blocks}: "
                "give the KV cache more memory"
            )

    def check_dimensions(self, params: PoolingParams) -> None:
        """An embedding's ``dimensions``: only the model's hidden size (as vLLM refuses any
        for a model not trained for shorter, matryoshka, vectors)."""
        size = self.limits.hidden_size
        if params.dimensions is not None and params.dimensions != size:
            raise ValueError(
                f"dimensions {params.dimensions} is not supported: this model's embeddings have "
                f"{size} (it is not trained for shorter, matryoshka, ones); leave dimensions "
                f"out or give {size}"
            )

    def check_priority(self, priority: object) -> int:
        """A request's priority as the scheduler takes it (an int64; numpy's integers as
        Python ints). A non-zero one needs the "priority" policy: as vLLM, refused under
        "fcfs" rather than ignored."""
        if not isinstance(priority, numbers.Integral) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        priority = int(priority)
        if not -INT64_MAX - 1 <= priority <= INT64_MAX:
            raise ValueError(f"priority must be in [-2**63, 2**63 - 1], got {priority}")
        policy = self.limits.scheduling_policy
        if priority != 0 and policy != "priority":
            raise ValueError(
                f"priority must be 0 unless scheduling_policy is 'priority' (priority "
                f"scheduling is not enabled: this engine's is {policy!r}), got {priority}"
            )
        return priority

    def priorities(self, priority: Iterable[int] | None, num_prompts: int) -> list[int]:
        """A batch's priorities, checked (``priority``: one per prompt, as vLLM's
        ``LLM.generate``; None: 0 each)."""
        if priority is None:
            return [0] * num_prompts
        if isinstance(priority, str | bytes | dict) or not isinstance(priority, Iterable):
            raise ValueError(
                f"priority must be a list of integers, one per prompt, got {priority!r}"
            )
        priorities = list(priority)
        if len(priorities) != num_prompts:
            raise ValueError(f"got {len(priorities)} priorities for {num_prompts} prompts")
        return [self.check_priority(p) for p in priorities]

    def default_params(self, prompt: str | list[int] | dict) -> SamplingParams:
        """The model's sampling defaults for ``prompt``, a request given no SamplingParams.
        Online, a default max_tokens (the model's max_new_tokens) past what max_model_len
        leaves the prompt is cut to fit, as the server's routes do, not refused."""
        defaults = self.limits.sampling_defaults
        params = SamplingParams(**defaults)
        if "max_tokens" not in defaults or not self.limits.serving:
            return params
        ids = self.tokenize(prompt)
        params = self.fit(ids, dataclasses.replace(params, max_tokens=None))
        self.validate(ids, params)
        return params

    def fit(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """``params`` with a missing max_tokens (up to max_model_len) capped by the model's
        max_new_tokens, as a server's routes run a request that sets none (``fit_max_tokens``).
        NOTE: check a request so fitted, not before: its KV-cache need is the capped one."""
        limits = self.limits
        return fit_max_tokens(
            params, limits.sampling_defaults, len(prompt_ids), limits.max_model_len
        )

    def max_new_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        """At least one (a prompt of max_model_len tokens: its one new token)."""
        max_len = self.limits.max_model_len
        return min(params.max_tokens or max_len, max(max_len - prompt_len, 1))

    def _check_allowed_not_all_banned(self, params: SamplingParams) -> None:
        """Until min_tokens is reached the sampler bans stop and EOS ids (EOS under ignore_eos
        too): allowed_token_ids of those alone would leave no token to sample."""
        allowed = set(params.allowed_token_ids or ())
        if not params.min_tokens or not allowed:
            return
        eos = self.limits.eos_token_ids
        if allowed <= set(params.stop_token_ids) | eos:
            raise ValueError(
                f"allowed_token_ids {sorted(allowed)} are all stop_token_ids or the model's EOS "
                f"ids ({sorted(eos)}), which min_tokens ({params.min_tokens}) bans until it is "
                "reached: no token could be sampled; allow another token or set min_tokens 0"
            )

    def _check_guided_choice(self, params: SamplingParams) -> None:
        if self.tokenizer is None:
            raise ValueError(
                f"guided_choice {params.guided_choice!r} needs a tokenizer and {NO_TOKENIZER}"
            )
        if not self.limits.eos_token_ids and not params.stop_token_ids:
            raise ValueError(
                f"guided_choice {params.guided_choice!r}: the output ends after a choice with "
                "an EOS token, and this model has none: give stop_token_ids"
            )
        ends = self.limits.eos_token_ids | set(params.stop_token_ids)
        for choice in params.guided_choice:
            [ids] = choice_token_ids(self.tokenizer, [choice])  # (ValueError: it makes none)
            self._check_in_vocab(f"guided_choice entry {choice!r} token id", ids)
            # NOTE: sampled there, an end token stops the output with no choice whole
            end = next((t for t in ids if t in ends), None)
            if end is not None:
                raise ValueError(
                    f"guided_choice entry {choice!r} holds the end token {end} (an EOS or stop "
                    "token id): the output would end inside it"
                )

    def _check_masked(self, what: str, after: str, params: SamplingParams) -> None:
        """JSON mode's, guided_regex's and guided_grammar's: masks made of the tokens'
        bytes, and an end."""
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer and {NO_TOKENIZER}")
        if not self.limits.eos_token_ids and not params.stop_token_ids:
            raise ValueError(
                f"{what}: the output ends after {after} with an EOS token, and this model has "
                "none: give stop_token_ids"
            )

    def _check_in_vocab(self, what: str, token_ids) -> None:
        vocab_size = self.limits.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"{what} {bad} is outside the vocabulary [0, {vocab_size})")


def request_ids(request_id: str | Iterable[str]) -> list[str]:
    """One request id or several (vLLM's abort takes both) as a list, each a string: the
    engine's loop keys on them (a list that reached it stopped the loop)."""
    one = isinstance(request_id, str) or not isinstance(request_id, Iterable)
    ids = [request_id] if one else list(request_id)
    bad = [r for r in ids if not isinstance(r, str)]
    if bad:
        raise ValueError(f"request ids must be strings, got {type(bad[0]).__name__}")
    return [str(r) for r in ids]  # (a str subclass's may not load in an engine process)


def stream_request_id(request_id: object) -> str:
    """A stream's request id: a new one when none is given; else a string, as ``abort``
    takes (an int was taken, then refused by ``abort``)."""
    if request_id is not None and not isinstance(request_id, str):
        raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
    return str(request_id) if request_id else uuid.uuid4().hex  # (plain: see request_ids)
