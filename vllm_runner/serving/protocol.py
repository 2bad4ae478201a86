"""Request models of the native and OpenAI-compatible endpoints (pydantic, validated at the edge).

Field limits mirror `SamplingParams` so that a bad value is rejected with the field's name
before it reaches the engine; cross-field rules are checked by building the SamplingParams.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core.core_schema import ValidationInfo

from vllm_runner.sample.grammar_parse import MAX_GRAMMAR_BYTES
from vllm_runner.sampling_params import INT64_MAX, SamplingParams
from vllm_runner.serving.chat_options import bounded_template
from vllm_runner.serving.chat_protocol import (
    ChatMessage,
    Tool,
    bounded_tools,
    check_forced_tools,
    check_tool_choice,
    check_tool_names,
    template_tools,
)
from vllm_runner.serving.forced_tools import forced_params
from vllm_runner.serving.prompt_logprobs import engine_top_k
from vllm_runner.serving.structured_outputs import json_mode, structured_choice
from vllm_runner.serving.unsupported import (
    UNSUPPORTED,
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    refuse_unsupported,
)

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# NOTE: the engine's step searches each new token's text for every stop string of every
# request (~0.14 us a string a token): a bounded list keeps one client from slowing all
MAX_STOP_STRINGS = 64
Stop = str | list[Annotated[str, Field(min_length=1)]] | None
# NOTE: each step builds every row's bias tensors from its dict; OpenAI takes at most 300
MAX_LOGIT_BIAS = 300
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]
# NOTE: each step builds every row's mask from its list (one index per entry)
MAX_ALLOWED_TOKEN_IDS = 1000
# NOTE: each step checks every bad word's tokens against the row's output
MAX_BAD_WORDS = 64
# NOTE: each step compares every choice's tokens with the row's output
MAX_GUIDED_CHOICES = 64
# NOTE: a new pattern compiles on the request's thread (regex_dfa's limits bound it: a
# hostile one is refused within ~2.5 s on a CPU core)
MAX_GUIDED_REGEX_CHARS = 65_536
Regex = Annotated[str, Field(min_length=1, max_length=MAX_GUIDED_REGEX_CHARS)]
# NOTE: a grammar compiles on the request's thread (grammar_compile's limits bound it; its
# text at most MAX_GRAMMAR_BYTES of UTF-8, checked there)
GrammarText = Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_BYTES)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]

_MAX_ENTRIES = {
    "stop": MAX_STOP_STRINGS,
    "logit_bias": MAX_LOGIT_BIAS,
    "allowed_token_ids": MAX_ALLOWED_TOKEN_IDS,
    "bad_words": MAX_BAD_WORDS,
    "guided_choice": MAX_GUIDED_CHOICES,
}


class SamplingFields(BaseModel):
    """Sampling settings shared by every generating endpoint (vLLM names and defaults), and
    the request's scheduling priority (not a sampling setting: passed on beside them)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    temperature: Annotated[float, Field(ge=0.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    seed: int | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    stop: Stop = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, Bias] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[Annotated[str, Field(min_length=1)]] | None = None
    guided_choice: (
        Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None
    ) = None
    json_object: bool = False  # the output is one JSON object (OpenAI's JSON mode)
    # the output fully matches it (vLLM's; the OpenAI routes: structured_outputs.regex too)
    guided_regex: Regex | None = None
    # a JSON schema (vLLM's; the OpenAI routes: response_format json_schema and
    # structured_outputs.json too), at most MAX_GUIDED_REGEX_CHARS as JSON text
    guided_json: dict[str, Any] | bool | str | None = None
    # the output is a whole sentence of it (vLLM's; the OpenAI routes: structured_outputs.
    # grammar too): EBNF / GBNF rules, root the start
    guided_grammar: GrammarText | None = None
    truncate_prompt_tokens: int | None = None
    # vLLM's: lower is served earlier; non-zero only under the engine's "priority" policy
    priority: Annotated[int, Field(ge=-(2**63), le=INT64_MAX)] = 0

    def sampling_params(
        self, defaults: Mapping[str, Any] | None = None, **overrides: Any
    ) -> SamplingParams:
        """``defaults``: the model's sampling defaults (``EngineLimits.sampling_defaults``),
        for the fields the client did not send (one sent wins, even at the built-in value).
        A max_tokens left out is capped by the model's (unless that is below the client's
        min_tokens); a None one (up to max_model_len) by ``fit_max_tokens`` (in
        ``engine/sampling_defaults.py``) once the prompt's length is known."""
        names = set(SamplingFields.model_fields) - {"priority"}
        values = {k: v for k, v in self.__dict__.items() if k in names}
        for name, value in (defaults or {}).items():
            if name in self.model_fields_set:
                continue
            if name != "max_tokens":
                values[name] = value
            elif values[name] is not None and min(values[name], value) >= values["min_tokens"]:
                values[name] = min(values[name], value)
        return SamplingParams(**{**values, **overrides})

    @field_validator(
        "stop", "logit_bias", "allowed_token_ids", "bad_words", "guided_choice", mode="before"
    )
    @classmethod
    def _bounded(cls, value: Any, info: ValidationInfo) -> Any:
        limit = _MAX_ENTRIES[info.field_name]
        if isinstance(value, list | dict) and len(value) > limit:
            raise ValueError(f"at most {limit} entries, got {len(value)}")
        return value

    @field_validator("guided_json", mode="before")
    @classmethod
    def _schema_size(cls, value: Any) -> Any:
        size = len(value if isinstance(value, str) else json.dumps(value, default=str))
        if size > MAX_GUIDED_REGEX_CHARS:
            raise ValueError(f"at most {MAX_GUIDED_REGEX_CHARS} characters as JSON, got {size}")
        return value

    @model_validator(mode="after")
    def _check_sampling(self) -> SamplingFields:
        self.sampling_params()  # raises ValueError naming the field and its limit
        return self


# ---- native endpoints -------------------------------------------------------------------


class GenerateRequest(SamplingFields):
    """POST /generate: one prompt, streamed back as text deltas."""

    prompt: Annotated[str, Field(min_length=1)]


class CompleteRequest(SamplingFields):
    """One item of POST /complete (adaptive-batched)."""

    prompt: Annotated[str, Field(min_length=1)] | TokenIds


class CompleteResult(BaseModel):
    text: str
    finish_reason: str | None  # "error" when the engine failed this item
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # what failed (the other items of the batch are unaffected)
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it


class ScoreRequest(BaseModel):
    """One item of POST /score: how likely is `continuation` right after `prompt`."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1)] | TokenIds
    continuation: Annotated[str, Field(min_length=1)] | TokenIds


class ScoreResult(BaseModel):
    logprob: float | None  # sum of the continuation's token log-probabilities (None: error)
    num_tokens: int  # continuation tokens scored
    token_logprobs: list[float]
    error: str | None = None  # what failed (the other items of the batch are unaffected)


# ---- OpenAI-compatible endpoints --------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool | None = None  # OpenAI: off unless asked (on with continuous usage)
    continuous_usage_stats: bool | None = None  # vLLM: the usage so far on every chunk


# OpenAI fields whose null means "the default" (the openai client sends null for None)
NULL_IS_DEFAULT = (
    "temperature", "top_p", "top_k", "min_p", "n", "stream", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens",
    "include_stop_str_in_output", "skip_special_tokens", "logprobs", "add_generation_prompt",
    "continue_final_message", "echo", "return_tokens_as_token_ids", "priority",
)  # fmt: skip


class OpenAIFields(SamplingFields):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")  # like vLLM: unknown OpenAI fields are ignored

    route_unsupported: ClassVar[dict[str, tuple[str, tuple[Any, ...]]]] = {}

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM: logprobs name each token "token_id:{id}" (the text is unchanged)
    return_tokens_as_token_ids: bool = False
    use_beam_search: bool = False  # vLLM's: n beams, the n best answered (beam_route.py)
    # vLLM's: the prompt tokens' logprobs and ranks (prompt_logprobs.py); a full prefill
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    length_penalty: float = 1.0  # (beam search's; a finite number, checked there)

    @property
    def include_usage(self) -> bool:
        opts = self.stream_options
        if opts is None:
            return False
        if opts.include_usage is None:  # vLLM: continuous usage alone implies the final one
            return bool(opts.continuous_usage_stats)
        return opts.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    @model_validator(mode="before")
    @classmethod
    def _openai_nulls_and_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = json_mode(data)
        refuse_unsupported(data, UNSUPPORTED)
        refuse_unsupported(data, cls.route_unsupported)
        data = structured_choice(data)
        check_tool_choice(data.get("tool_choice"))
        best_of, n = data.get("best_of"), data.get("n") or 1
        if best_of is not None and best_of != n:
            raise ValueError(f"best_of must equal n ({n}) or be left out, got {best_of!r}")
        return {k: v for k, v in data.items() if not (v is None and k in NULL_IS_DEFAULT)}

    @model_validator(mode="after")
    def _check_stream_options(self) -> OpenAIFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true (as in vLLM)")
        if self.stream and self.prompt_logprobs is not None:  # (vLLM sends none in a stream)
            raise ValueError(
                f"prompt_logprobs are not available with stream: true (as in vLLM), got "
                f"{self.prompt_logprobs}"
            )
        return self


class CompletionRequest(OpenAIFields):
    route_unsupported = UNSUPPORTED_COMPLETION

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False  # each choice's text (and logprobs) starts with the prompt's
    # as vLLM: 0 (with echo) answers the prompt alone, e.g. to score its tokens
    max_tokens: Annotated[int, Field(ge=0)] | None = 16

    def sampling_params(
        self, defaults: Mapping[str, Any] | None = None, **overrides: Any
    ) -> SamplingParams:
        if self.max_tokens == 0:
            if not self.echo:
                raise ValueError("max_tokens must be >= 1 (0 only with echo: true), got 0")
            if self.min_tokens:
                raise ValueError(f"min_tokens must be <= max_tokens (0), got {self.min_tokens}")
            # NOTE: the engine samples one token (its step computes the prompt's logprobs);
            # the route drops it
            overrides = {"max_tokens": 1, **overrides}
        return super().sampling_params(defaults, **overrides)

    def completion_sampling_params(self, defaults: Mapping[str, Any]) -> SamplingParams:
        # the prompt's logprobs only when asked or echoed (they cost a full prefill, uncached)
        prompt_logprobs = engine_top_k(self.prompt_logprobs, self.logprobs if self.echo else None)
        return self.sampling_params(
            defaults, n=self.n, logprobs=self.logprobs, prompt_logprobs=prompt_logprobs
        )

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class ChatCompletionRequest(OpenAIFields):
    route_unsupported = UNSUPPORTED_CHAT

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool = True  # vLLM: end the prompt in the assistant's header
    continue_final_message: bool = False  # vLLM: continue the last (assistant) message
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: more template variables
    # vLLM's: instead of the model's (chat_options.py: under trust_request_chat_template)
    chat_template: Annotated[str | None, BeforeValidator(bounded_template)] = None
    echo: bool = False  # vLLM's: a reply continuing the last message starts with its content
    tools: list[Tool] | None = None  # given to the chat template
    # None: "auto" with tools, as OpenAI; "required" or {"type": "function", "function":
    # {"name": ...}} force a call (forced_tools.py; other values: check_tool_choice)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None

    @field_validator("tools", mode="before")
    @classmethod
    def _few_tools(cls, value: Any) -> Any:
        return bounded_tools(value)

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        check_tool_names(self.tools)
        guided = ("guided_json", "guided_regex", "guided_grammar", "guided_choice", "json_object")
        check_forced_tools(self.tools, self.tool_choice, [g for g in guided if getattr(self, g)])
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError(
                f"top_logprobs requires logprobs: true, got {self.top_logprobs} without it"
            )
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError(
                "continue_final_message needs add_generation_prompt: false, got True with "
                "add_generation_prompt True"
            )
        return self

    def template_options(self) -> dict[str, Any]:
        return {
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
            "template_kwargs": self.chat_template_kwargs,
            "chat_template": self.chat_template,
            "tools": template_tools(self.tools),
        }

    def tool_names(self) -> frozenset[str]:
        return frozenset(t.function.name for t in self.tools or ())

    def as_sent(self, message: str) -> str:
        """An error ``message`` that names max_tokens, naming max_completion_tokens instead
        when that is the limit this request set (the engine knows only max_tokens)."""
        if self.max_completion_tokens is None:
            return message
        return re.sub(r"\bmax_tokens\b", "max_completion_tokens", message)

    def chat_sampling_params(self, defaults: Mapping[str, Any]) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        guided = forced_params(self.tool_choice, self.tools)  # a forced call's schema
        try:
            return self.sampling_params(
                defaults, max_tokens=max_tokens, n=self.n, logprobs=logprobs,
                prompt_logprobs=self.prompt_logprobs, **guided,
            )  # fmt: skip
        except ValueError as exc:  # (guided_json: the tools' parameters, or what it refuses)
            if not guided:
                raise
            raise ValueError(f"tool_choice (a forced call's arguments are guided): {exc}") from None
