"""Synchronous offline generation and embeddings: add every prompt, step until all finish."""

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from vllm_runner import beam_search as beams
from vllm_runner.config import EngineArgs
from vllm_runner.engine.core import EngineCore
from vllm_runner.engine.errors import RequestError
from vllm_runner.engine.input_processor import TextPrompt, TokensPrompt
from vllm_runner.engine.outputs import EmbeddingRequestOutput, FinalOutput, RequestOutput
from vllm_runner.lora.request import LoRARequest, lora_requests
from vllm_runner.pooling_params import PoolingParams
from vllm_runner.sampling_params import SamplingParams
from vllm_runner.tokenizer import NO_TOKENIZER

Prompt = str | list[int] | TextPrompt | TokensPrompt  # (the dicts: as vLLM's)


def engine_args(
    model: str | None, model_name: str | None, kwargs: dict, **switches: bool | None
) -> EngineArgs:
    """``switches``: a front end's own (AsyncLLM's), True or False (None: its default)."""
    for name, value in switches.items():
        if value is not None and not isinstance(value, bool):  # ("no" was read as true)
            raise ValueError(f"{name} must be True or False, got {value!r}")
    unknown = set(kwargs) - EngineArgs.field_names()
    if unknown:
        raise ValueError(
            f"unknown engine argument(s) {sorted(unknown)}; "
            f"known: {sorted(EngineArgs.field_names())}"
        )
    if model is not None and model_name is not None and model != model_name:
        raise ValueError(f"model={model!r} and model_name={model_name!r} disagree")
    return EngineArgs(model=model if model is not None else model_name, **kwargs)


def normalize_batch(
    prompts: Prompt | Sequence[Prompt],
    params: SamplingParams | Sequence[SamplingParams] | None,
    default: SamplingParams,
    kind: type = SamplingParams,
) -> tuple[list[Prompt], list[SamplingParams]]:
    """``default``: the params of every prompt when ``params`` is None (the model's).
    ``kind``: the params' class (PoolingParams for embeddings)."""
    # NOTE: a dict (vLLM's {"prompt": ...}) is one prompt: as a batch its keys were read as
    # prompt texts.
    if (
        isinstance(prompts, str | dict)
        or not isinstance(prompts, Iterable)
        or (isinstance(prompts, list | tuple) and prompts and isinstance(prompts[0], int))
    ):
        prompts = [prompts]  # (one of another type: refused naming it by tokenize)
    prompts = list(prompts)
    if params is None:
        params = default
    if isinstance(params, kind):
        params_list = [params] * len(prompts)
    else:
        # NOTE: a dict or a string is not a list of them (iterated, its keys or characters)
        one = isinstance(params, str | dict) or not isinstance(params, Iterable)
        params_list = [params] if one else list(params)
        bad = [p for p in params_list if not isinstance(p, kind)]
        name = kind.__name__
        if bad:
            argument = "pooling_params" if kind is PoolingParams else "sampling_params"
            raise ValueError(
                f"{argument} must be a {name} or a list of them (one per prompt), "
                f"got {type(bad[0]).__name__}"
            )
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} {name} for {len(prompts)} prompts")
    return prompts, params_list


class LLM:
    """Offline batch generation and embeddings on one engine."""

    def __init__(
        self, model: str | None = None, *, model_name: str | None = None, **kwargs
    ) -> None:
        self.engine = EngineCore(engine_args(model, model_name, kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | Callable[..., Any] = False,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """``use_tqdm``: a progress bar of finished prompts on stderr (True: tqdm's; or a
        tqdm-like class), as vLLM's (whose default is True). ``priority``: one per prompt,
        as vLLM's (lower is served earlier); the engine's ``scheduling_policy`` must be
        "priority" for any but 0. ``lora_request``: the LoRA adapter of every prompt, or a
        list of one per prompt (None: the base model), as vLLM's (needs ``enable_lora``)."""
        default = self.get_default_sampling_params()
        prompts, params = normalize_batch(prompts, sampling_params, default)
        inputs = self.engine.inputs
        priorities = inputs.priorities(priority, len(prompts))
        loras = lora_requests(lora_request, len(prompts))
        ids = [inputs.tokenize(p, False, sp) for p, sp in zip(prompts, params, strict=True)]
        return self._run(prompts, ids, params, use_tqdm, priorities, loras=loras)

    def embed(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool | Callable[..., Any] = False,
        priority: Sequence[int] | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """As vLLM's: one embedding per prompt (``outputs.embedding``, a list of floats), the
        final hidden states pooled as the engine's ``pooler_config`` says (the LAST token's,
        L2-normalised, by default). ``truncate_prompt_tokens``: set on every prompt's
        PoolingParams. A request that failed (its step did) raises RequestError."""
        prompts, params = normalize_batch(prompts, pooling_params, PoolingParams(), PoolingParams)
        if truncate_prompt_tokens is not None:
            params = [dataclasses.replace(p, truncate_prompt_tokens=truncate_prompt_tokens)
                      for p in params]  # fmt: skip
        inputs = self.engine.inputs
        priorities = inputs.priorities(priority, len(prompts))
        ids = [inputs.tokenize(p, False, pp) for p, pp in zip(prompts, params, strict=True)]
        return self._run(prompts, ids, params, use_tqdm, priorities, raise_failed=True)

    def _run(
        self,
        prompts: list[Prompt],
        ids: list[list[int]],
        params: list[SamplingParams] | list[PoolingParams],
        use_tqdm: bool | Callable[..., Any],
        priorities: list[int] | None = None,
        raise_failed: bool = False,
        loras: list[LoRARequest | None] | None = None,
    ) -> list[FinalOutput]:
        """``priorities``, ``loras``: one per prompt (None: 0, no adapter each).
        ``raise_failed``: a request the engine failed raises RequestError (holding every
        output), naming why."""
        if not isinstance(use_tqdm, bool) and not callable(use_tqdm):
            raise ValueError(f"use_tqdm must be True, False or a tqdm-like class, got {use_tqdm!r}")
        loras = loras or [None] * len(prompts)
        for prompt_ids, p, lora in zip(ids, params, loras, strict=True):  # all before any add
            self.engine.inputs.validate(prompt_ids, p, lora)
        states = []
        bar = _progress_bar(use_tqdm, len(prompts))
        try:
            each = zip(prompts, ids, params, priorities or [0] * len(prompts), loras, strict=True)
            for prompt, prompt_ids, p, priority, lora in each:
                state = self.engine.add_request(
                    prompt, p, prompt_ids=prompt_ids, priority=priority, lora_request=lora
                )
                states.append(state)
            while self.engine.has_unfinished():
                self.engine.step(stream=False)
                if bar is not None:
                    bar.update(sum(s.finished for s in states) - bar.n)
        except BaseException:  # e.g. KeyboardInterrupt: a later call must not run these
            for s in states:
                self.engine.abort(s.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        self.engine.pop_finished()
        outs = [s.final_output() for s in states]
        failed = next((s for s in states if s.error is not None), None)
        if raise_failed and failed is not None:
            raise RequestError(f"request {failed.request_id} failed: {failed.error}", outs)
        return outs

    def beam_search(
        self, prompts: Prompt | Sequence[Prompt], params: beams.BeamSearchParams
    ) -> list[beams.BeamSearchOutput]:
        """As vLLM's: each prompt's ``params.beam_width`` best sequences (beam_search.py);
        each round is one batch of every prompt's live beams."""
        prompts, _ = normalize_batch(prompts, None, SamplingParams())
        searches = beams.start(self.engine.inputs, prompts, params)
        while asked := beams.round_prompts(searches):
            ids = [tokens for _, tokens in asked]
            outs = self._run(list(ids), ids, [beams.round_params(params)] * len(ids), False)
            beams.advance(searches, asked, [o.outputs[0].logprobs[0] for o in outs])
        return beams.results(searches, self.tokenizer)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        use_tqdm: bool | Callable[..., Any] = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """``chat_template``: the Jinja template to use instead of the tokenizer's (as vLLM's;
        a model whose tokenizer has none can chat only with one). ``chat_template_kwargs``:
        more variables for the template (e.g. ``{"enable_thinking": False}``), as vLLM's.
        ``tools``: OpenAI-style tool dicts (``{"type": "function", "function": {...}}``) for
        the template to render, as vLLM's (the output is not parsed for calls here).
        ``lora_request``: as ``generate``'s, per conversation."""
        if tools is not None and (
            not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
        ):
            raise ValueError(f"tools must be a list of tool dicts, got {str(tools)[:80]!r}")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.apply_chat_template(
                c,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                template_kwargs=chat_template_kwargs,
                tools=tools,
            )
            for c in conversations
        ]
        _, params = normalize_batch(prompts, sampling_params, self.get_default_sampling_params())
        inputs = self.engine.inputs
        loras = lora_requests(lora_request, len(prompts))
        ids = [inputs.tokenize(p, True, sp) for p, sp in zip(prompts, params, strict=True)]
        return self._run(prompts, ids, params, use_tqdm, loras=loras)

    def apply_chat_template(self, messages: list[dict], **options: Any) -> str:
        return apply_chat_template(
            self.tokenizer, messages, self.engine.model_config.name, **options
        )

    def get_default_sampling_params(self) -> SamplingParams:
        """As vLLM's: SamplingParams of the model's sampling defaults (its
        generation_config.json; none with ``generation_config="vllm"``), which requests
        given no SamplingParams use."""
        return SamplingParams(**self.engine.limits.sampling_defaults)

    def get_tokenizer(self):
        """The model's HF tokenizer (None for a folder without one), as vLLM's."""
        return self.tokenizer

    @property
    def llm_engine(self) -> "EngineView":
        """vLLM's ``llm.llm_engine``, for what scripts read of it (``model_config``)."""
        return EngineView(self.engine)

    def stats(self) -> dict[str, int]:
        return self.engine.stats()


class EngineView:
    """What vLLM scripts read of ``llm.llm_engine``: ``model_config`` (``max_model_len``,
    ``hf_config``, ``dtype``) and the tokenizer. NOTE: not the engine itself, whose
    ``add_request`` takes other arguments than vLLM's LLMEngine's: a script driving vLLM's
    request loop gets an AttributeError, not requests read with the wrong arguments."""

    def __init__(self, engine: EngineCore) -> None:
        self.model_config = engine.model_config
        self.tokenizer = engine.tokenizer

    def get_model_config(self):
        return self.model_config

    def get_tokenizer(self):
        return self.tokenizer


def apply_chat_template(
    tokenizer,
    messages: list[dict],
    model: str,
    prompts_to: str = "generate()",
    offer_template: bool = True,
    *,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The conversation as the model's prompt text: ending in the assistant's header (a new
    reply) or, with `continue_final_message`, in the last message's open text (as vLLM).
    ``chat_template``: instead of the tokenizer's. ``tools``: their JSON schemas, for the
    template to render (one that knows no tools ignores them, as in HF transformers). A model
    that cannot chat is refused naming ``model`` and the way out: ``prompts_to``, which takes
    plain prompts, and (if ``offer_template``) ``chat(chat_template=...)``."""
    if tokenizer is None:
        raise ValueError(f"model {model!r}: {NO_TOKENIZER}, so it cannot chat; use {prompts_to} "
                         "with token ids")  # fmt: skip
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        # NOTE: transformers has had no default template since 4.44 (nor has vLLM)
        offer = "pass chat_template=... to chat(), or " if offer_template else ""
        raise ValueError(
            f"model {model!r} has no chat template (its tokenizer defines none): {offer}use "
            f"{prompts_to} with a prompt you templated yourself"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:  # content: none for an assistant's
            raise ValueError(f"messages[{i}] must be a dict with a 'role' and its 'content'")
    if template_kwargs is not None and not isinstance(template_kwargs, dict):
        raise ValueError(f"chat_template_kwargs must be a dict, got {template_kwargs!r}")
    taken = sorted(set(template_kwargs or ()) & _TEMPLATE_ARGUMENTS)
    if taken:
        shown = repr(template_kwargs)  # a server's client may send a megabyte of it
        shown = shown if len(shown) <= 80 else shown[:80] + "..."
        raise ValueError(f"chat_template_kwargs may not set the template call's own arguments "
                         f"{taken}, got {shown}")  # fmt: skip
    if add_generation_prompt and continue_final_message:
        raise ValueError(
            "continue_final_message continues the last message; it needs "
            "add_generation_prompt false, got both true"
        )
    return tokenizer.apply_chat_template(
        [{**m, "content": _content_text(i, m.get("content"))} for i, m in enumerate(messages)],
        chat_template=chat_template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tools=tools,
        **(template_kwargs or {}),
    )


# apply_chat_template's own arguments, and the variable the template reads the conversation
# from: not template variables
_TEMPLATE_ARGUMENTS = {"conversation", "messages", "chat_template", "tokenize",
                       "add_generation_prompt", "continue_final_message", "tools", "documents",
                       "return_dict"}  # fmt: skip


def _progress_bar(use_tqdm: bool | Callable[..., Any], total: int):
    if use_tqdm is False:
        return None
    if use_tqdm is True:
        from tqdm import tqdm as use_tqdm  # (transformers' dependency)
    return use_tqdm(total=total, desc="Processed prompts", unit="prompt", dynamic_ncols=True)


def _content_text(i: int, content: str | list[dict] | None) -> str:
    """A message's content as the template's text: OpenAI's text parts are lines of one
    text, None (an assistant's message) is empty, as in vLLM and the chat route."""
    if not isinstance(content, list):
        return content or ""
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(
                f"messages[{i}] content part {j} has type {kind!r}: this engine takes only "
                "text parts ({'type': 'text', 'text': ...})"
            )
    return "\n".join(part["text"] for part in content)
