"""Request models of the native and OpenAI-compatible endpoints (pydantic, validated at the edge).

Field limits mirror `SamplingParams` so that a bad value is rejected with the field's name
before it reaches the engine; cross-field rules are checked by building the SamplingParams.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vllm_runner.sampling_params import INT64_MAX, SamplingParams

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Stop = str | list[Annotated[str, Field(min_length=1)]] | None
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class SamplingFields(BaseModel):
    """Sampling settings shared by every generating endpoint (vLLM names and defaults)."""

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
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        names = set(SamplingFields.model_fields)
        values = {k: v for k, v in self.__dict__.items() if k in names}
        return SamplingParams(**{**values, **overrides})

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
    include_usage: bool = False


# OpenAI fields whose null means "the default" (the openai client sends null for None)
NULL_IS_DEFAULT = (
    "temperature", "top_p", "top_k", "min_p", "n", "stream", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens",
    "include_stop_str_in_output", "skip_special_tokens", "echo", "logprobs",
)  # fmt: skip
# OpenAI / vLLM fields that change the output and that this server does not implement: a
# request using them is refused rather than answered as if they were absent.
UNSUPPORTED = {
    "suffix": "suffix",
    "response_format": "structured output (response_format)",
    "tools": "tool calling (tools)",
    "functions": "function calling (functions)",
    "function_call": "function calling (function_call)",
    "guided_json": "guided decoding (guided_json)",
    "guided_regex": "guided decoding (guided_regex)",
    "guided_choice": "guided decoding (guided_choice)",
    "guided_grammar": "guided decoding (guided_grammar)",
    "structured_outputs": "structured output (structured_outputs)",
}


class OpenAIFields(SamplingFields):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")  # like vLLM: unknown OpenAI fields are ignored

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @model_validator(mode="before")
    @classmethod
    def _openai_nulls_and_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, feature in UNSUPPORTED.items():
            value = data.get(name)
            if (
                value is None
                or value == []
                or (name == "response_format" and value == {"type": "text"})
            ):
                continue
            raise ValueError(f"{name}: {feature} is not supported by this server")
        if data.get("tool_choice") not in (None, "none", "auto"):
            raise ValueError("tool_choice: tool calling is not supported by this server")
        best_of, n = data.get("best_of"), data.get("n") or 1
        if best_of is not None and best_of != n:
            raise ValueError(f"best_of must equal n ({n}) or be left out, got {best_of!r}")
        return {k: v for k, v in data.items() if not (v is None and k in NULL_IS_DEFAULT)}

    @model_validator(mode="after")
    def _check_stream_options(self) -> OpenAIFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true (as in vLLM)")
        return self


class CompletionRequest(OpenAIFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: Literal[False] = False

    def completion_sampling_params(self) -> SamplingParams:
        logprobs = None if self.logprobs is None else engine_logprobs(self.logprobs)
        return self.sampling_params(n=self.n, logprobs=logprobs)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


def engine_logprobs(top_n: int) -> int:
    # NOTE: the engine reports only the top-N candidates of each step; asking for at least
    # one makes the sampled token's own logprob known whenever it is the most likely one
    # (always, for greedy decoding). Responses are cut back to the N the client asked for.
    return max(top_n, 1)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):  # text parts are lines of one message, as in vLLM
            content = "\n".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(OpenAIFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def chat_sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = engine_logprobs(self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens=max_tokens, n=self.n, logprobs=logprobs)
