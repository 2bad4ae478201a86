"""What the sampler reads of a request (``SamplingRow``), and host values sent to the device
without a sync."""

import functools
from dataclasses import dataclass

import torch

from vllm_runner.sample.grammar_states import GrammarCursor
from vllm_runner.sample.json_grammar import JsonCursor
from vllm_runner.sample.regex_dfa import RegexCursor
from vllm_runner.sampling_params import SamplingParams

FP32_MAX = torch.finfo(torch.float32).max


@dataclass
class SamplingRow:
    """What the sampler needs of one request (token lists are read, not copied, unless a
    penalty needs them); the runner's request states are rows, read in place each step."""

    params: SamplingParams
    token_ids: list[int]  # prompt + output known on the host
    num_prompt_tokens: int
    seed: int | None  # per completion (seed + index for n > 1)
    num_pending: int = 0  # sampled earlier, still on the device
    json_cursor: JsonCursor | None = None  # json_object: the output's state (json_masks.py)
    regex_cursor: RegexCursor | None = None  # guided_regex: its DFA state, counts (regex_masks.py)
    grammar_cursor: GrammarCursor | None = None  # guided_grammar: its parses (grammar_masks.py)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @functools.cached_property
    def race_settings(self) -> tuple[float, float, float, int]:
        """The sampling kernel's (temperature, top_p, min_p, top_k), made once per request.
        NOTE: a temperature at most fp32's largest (beyond it, inf there: NaN logits); a
        top_k at most 2**24, exact in fp32 and past any vocabulary (off there, as any k >=
        the vocabulary)."""
        p = self.params
        t = 0.0 if p.greedy else min(p.temperature, FP32_MAX)
        return t, p.top_p, p.min_p, min(p.top_k, 1 << 24)

    @functools.cached_property
    def has_extras(self) -> bool:
        """Whether the row asks for logprobs, a logit bias, allowed ids, bad words, choices,
        JSON, a regex, a grammar, penalties or min_tokens, beyond temperature / top-k / top-p /
        min-p (made once per request)."""
        p = self.params
        extras = (p.logit_bias, p.allowed_token_ids, p.bad_words_token_ids,
                  p.guided_choice_token_ids, p.json_object, p.guided_pattern, p.guided_grammar,
                  p.has_penalties, p.min_tokens)  # fmt: skip
        return p.logprobs is not None or any(extras)


def host_values(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host ``values`` (a list or a numpy array) as a tensor on ``device``, without waiting
    for the device. ``torch.tensor(values, device=cuda)`` copies from pageable memory, which
    waits for all work queued before it: in a step's sampling, that is the whole forward,
    and async scheduling's overlap was lost for every step with a sampled (temperature > 0)
    request (py-spy, H200, `bentoml serve` under 256 chat streams: 9% of the engine loop
    waiting there). From pinned memory the copy is queued like a kernel."""
    if device.type != "cuda":
        return torch.as_tensor(values, dtype=dtype, device=device)
    return torch.as_tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
