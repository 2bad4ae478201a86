"""Beam search (vLLM's ``LLM.beam_search`` and ``use_beam_search``), on top of the engine.

Each round asks the engine for one token after every live beam, with the top
``2 * beam_width`` logprobs (the model's raw log-softmax, as vLLM's): a beam's prompt is its
whole sequence, so the prefix cache serves all but its newest tokens. Every candidate that
ends with an end token (and ``ignore_eos`` is off) is kept as finished; of the others the
``beam_width`` best go on. After ``max_tokens`` rounds (or when no beam is left) the finished
sequences and the live ones are ranked together and the ``beam_width`` best returned. A
sequence's score is its cumulative logprob over ``len ** length_penalty``, ``len`` counting
the prompt and every token but a final end token (as vLLM's).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from vllm_runner.engine.errors import ContextLengthError
from vllm_runner.sampling_params import SamplingParams

MAX_LOGPROBS = 20  # SamplingParams' bound on logprobs: each round asks for 2 * beam_width


@dataclass(frozen=True)
class BeamSearchParams:
    """As vLLM's: ``beam_width`` sequences kept per prompt, ``max_tokens`` rounds at most."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        width_limit = MAX_LOGPROBS // 2
        for name, low, high in (("beam_width", 1, width_limit), ("max_tokens", 1, None)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < low or (high is not None and value > high):
                limit = f"in [{low}, {high}]" if high is not None else f">= {low}"
                why = f" (each round reads the top 2 x beam_width <= {MAX_LOGPROBS} logprobs)"
                raise ValueError(f"{name} must be {limit}{why if high else ''}, got {value!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        # NOTE: candidates come from the raw logprobs, which a temperature does not change;
        # vLLM takes the setting and leaves it unused: refused here rather than ignored
        if self.temperature != 0.0:
            raise ValueError(
                f"temperature must be 0 for beam search (candidates are ranked by the raw "
                f"logprobs), got {self.temperature!r}"
            )
        lp = self.length_penalty
        if not isinstance(lp, numbers.Real) or isinstance(lp, bool) or not math.isfinite(lp):
            raise ValueError(f"length_penalty must be a finite number, got {lp!r}")


@dataclass
class BeamSearchSequence:
    """One sequence: ``tokens`` holds the prompt's and the generated ones (as vLLM's);
    ``logprobs``: per generated token, the round's top logprobs."""

    tokens: list[int]
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None  # all tokens decoded, the prompt's too (as vLLM's)
    finish_reason: str | None = None  # "stop" (an end token) or "length"
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]


@dataclass
class BeamSearchOutput:
    """One prompt's best sequences, best first."""

    sequences: list[BeamSearchSequence]


def score(seq: BeamSearchSequence, length_penalty: float, ends: set[int]) -> float:
    # NOTE: a final end token is left out whether it finished the beam or not (ignore_eos),
    # as vLLM's get_beam_search_score
    length = len(seq.tokens) - (seq.tokens[-1] in ends)
    return seq.cum_logprob / (length**length_penalty)


class BeamSearch:
    """One prompt's search: ``pending()`` the beams that need their next token's logprobs,
    ``advance()`` with them, until ``done``; then ``result()``."""

    def __init__(self, prompt_ids: list[int], params: BeamSearchParams, ends: set[int]) -> None:
        self.params, self.ends = params, ends
        self.beams = [BeamSearchSequence(list(prompt_ids), num_prompt_tokens=len(prompt_ids))]
        self.finished: list[BeamSearchSequence] = []
        self.rounds = 0

    @property
    def done(self) -> bool:
        return not self.beams or self.rounds >= self.params.max_tokens

    def pending(self) -> list[list[int]]:
        return [] if self.done else [b.tokens for b in self.beams]

    def advance(self, logprobs: list[dict[int, float]]) -> None:
        """``logprobs``: per pending beam, its next token's top logprobs (at least
        ``2 * beam_width`` of them)."""
        if len(logprobs) != len(self.beams):
            raise RuntimeError(f"{len(logprobs)} logprobs for {len(self.beams)} beams")
        width = 2 * self.params.beam_width
        candidates = []
        for beam, top in zip(self.beams, logprobs, strict=True):
            # the best 2 * width (the sampled token's may be one more), ties by token id
            best = sorted(top.items(), key=lambda item: (-item[1], item[0]))[:width]
            for token, lp in best:
                seq = BeamSearchSequence(
                    [*beam.tokens, token],
                    [*beam.logprobs, top],
                    beam.cum_logprob + lp,
                    num_prompt_tokens=beam.num_prompt_tokens,
                )
                if token in self.ends and not self.params.ignore_eos:
                    seq.finish_reason = "stop"
                    self.finished.append(seq)
                else:
                    candidates.append(seq)
        self.rounds += 1
        self.beams = self._best(candidates)

    def result(self) -> list[BeamSearchSequence]:
        for beam in self.beams:
            beam.finish_reason = "length"
        return self._best(self.finished + self.beams)

    def _best(self, seqs: list[BeamSearchSequence]) -> list[BeamSearchSequence]:
        # (a stable sort: among equal scores the earlier candidate, i.e. the better parent)
        ranked = sorted(seqs, key=lambda s: -score(s, self.params.length_penalty, self.ends))
        return ranked[: self.params.beam_width]


def round_params(params: BeamSearchParams) -> SamplingParams:
    """A round's request: one token, the top logprobs (the sampled token is not used)."""
    return SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * params.beam_width,
                          ignore_eos=True, detokenize=False)  # fmt: skip


def start(inputs, prompts: list, params: BeamSearchParams) -> list[BeamSearch]:
    """A search per prompt (``inputs``: the engine's InputProcessor), each prompt checked
    first: it and ``max_tokens`` new tokens must fit the model's context."""
    if not isinstance(params, BeamSearchParams):
        raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    searches = []
    final = SamplingParams(max_tokens=params.max_tokens, logprobs=2 * params.beam_width)
    limit = inputs.limits.max_model_len
    for prompt in prompts:
        ids = inputs.tokenize(prompt)
        inputs.validate(ids, final)
        # (offline, generate() lets a prompt's output stop at max_model_len; a round's
        # prompt, the whole beam, must fit, so the search's length is checked here)
        if len(ids) + params.max_tokens > limit:
            raise ContextLengthError(
                f"beam search: a prompt of {len(ids)} tokens + max_tokens {params.max_tokens} "
                f"= {len(ids) + params.max_tokens} do not fit max_model_len {limit}",
                limit,
            )
        searches.append(BeamSearch(ids, params, set(inputs.limits.eos_token_ids)))
    return searches


def round_prompts(searches: list[BeamSearch]) -> list[tuple[int, list[int]]]:
    """This round's requests: (search index, the beam's tokens)."""
    return [(i, tokens) for i, s in enumerate(searches) for tokens in s.pending()]


def advance(
    searches: list[BeamSearch], asked: list[tuple[int, list[int]]], logprobs: list[dict]
) -> None:
    """Each search past its round, given the logprobs of every request ``round_prompts``
    made (in its order)."""
    per_search: dict[int, list[dict[int, float]]] = {}
    for (i, _), top in zip(asked, logprobs, strict=True):
        per_search.setdefault(i, []).append(top)
    for i, tops in per_search.items():
        searches[i].advance(tops)


def results(searches: list[BeamSearch], tokenizer) -> list[BeamSearchOutput]:
    """The searches' best sequences, their text decoded (None without a tokenizer)."""
    outputs = []
    for search in searches:
        seqs = search.result()
        for seq in seqs:
            seq.text = None if tokenizer is None else tokenizer.decode(seq.tokens)
        outputs.append(BeamSearchOutput(seqs))
    return outputs
