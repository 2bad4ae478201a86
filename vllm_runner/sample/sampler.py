"""Token sampling: a greedy fast path, then temperature / top-k / top-p / min-p / penalties.

Random choice samples exactly from p: on a GPU by the exponential race (argmax of p / q,
q ~ Exp(1)) in one kernel that also filters without a sort (kernels/sampling.py), on the
CPU by inverse CDF (one uniform per row: a variate per vocabulary entry is slow there). A
seeded request draws from variates keyed by (seed, output position), so its tokens depend
on nothing else in the batch and survive preemption.
"""

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from vllm_runner.sample.bad_words import ban_bad_words
from vllm_runner.sample.grammar_masks import GrammarMasks, apply_guided_grammar
from vllm_runner.sample.guided_choice import apply_guided_choice
from vllm_runner.sample.json_masks import JsonMasks, apply_json_object
from vllm_runner.sample.logprobs import logprob_entries, logprob_tensors
from vllm_runner.sample.regex_masks import RegexMasks, apply_guided_regex
from vllm_runner.sample.rows import FP32_MAX, SamplingRow, host_values

_SEED_STRIDE = 1_000_003


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row: (sampled token's logprob, {token id: logprob} top-N) or None
    logprobs: list[tuple[float, dict[int, float]] | None]


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Each row's biases added to its logits, before penalties (vLLM V1's order): every
    row's in one indexed add (two copies a step, not two a row)."""
    which, ids, biases = [], [], []
    for i, row in enumerate(rows):
        bias = row.params.logit_bias
        if bias:
            which += [i] * len(bias)
            ids += bias.keys()
            biases += bias.values()
    index = host_values([which, ids], torch.long, logits.device)
    values = host_values(biases, logits.dtype, logits.device)
    logits.index_put_((index[0], index[1]), values, accumulate=True)


def apply_allowed_token_ids(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """-inf on every token outside a row's allowed_token_ids (rows without any: untouched),
    every row's in one host-to-device copy and one fill."""
    lists = [row.params.allowed_token_ids or () for row in rows]
    lengths = [len(ids) for ids in lists]
    flat = np.fromiter(itertools.chain.from_iterable(lists), np.int64, sum(lengths))
    flat += np.repeat(np.arange(len(rows), dtype=np.int64) * logits.shape[1], lengths)
    index = host_values(flat, torch.long, logits.device)  # row * vocab + token id
    allowed = torch.zeros(logits.numel(), dtype=torch.bool, device=logits.device)
    allowed = allowed.index_fill_(0, index, True).view_as(logits)  # [rows, vocab]
    # NOTE: a row with a (non-empty) list has some True: rows with none keep every token
    logits.masked_fill_(allowed.any(dim=-1, keepdim=True) & ~allowed, float("-inf"))


def apply_penalties(
    logits: torch.Tensor, rows: list[SamplingRow], pending: torch.Tensor | None = None
) -> None:
    """vLLM's penalties on the rows that have any, all rows at once: repetition (logits of
    tokens in the prompt or the output divided if positive, else multiplied), then frequency
    (times each token's output count) and presence (once per token in the output).
    ``pending`` [rows]: each row's output token still on the device (async scheduling), or -1;
    it counts as output like the tokens on the host."""
    which = [i for i, row in enumerate(rows) if row.params.has_penalties]
    pen = [rows[i].params for i in which]
    device, vocab = logits.device, logits.shape[1]
    counts = token_counts([rows[i].output_token_ids for i in which], vocab, device)
    index = host_values(which, torch.long, device)
    if pending is not None:  # no host sync: rows without one add 0 at token 0
        ids = pending[index]
        at = (torch.arange(len(which), device=device), ids.clamp(min=0))
        counts.index_put_(at, (ids >= 0).to(counts.dtype), accumulate=True)
    x = logits[index]
    if any(p.repetition_penalty != 1.0 for p in pen):
        prompts = [rows[i].prompt_token_ids if p.repetition_penalty != 1.0 else []
                   for i, p in zip(which, pen, strict=True)]  # fmt: skip
        seen = (token_counts(prompts, vocab, device) > 0) | (counts > 0)
        # floored at 1e-30: a smaller (valid) penalty overflowed fp32 to +inf, which tied the
        # seen tokens and made NaN probabilities; at 1e-30 they already lead by > 1e29
        rep = [max(p.repetition_penalty, 1e-30) for p in pen]
        rep = host_values(rep, torch.float32, device)[:, None]
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    freq = host_values([p.frequency_penalty for p in pen], torch.float32, device)[:, None]
    presence = host_values([p.presence_penalty for p in pen], torch.float32, device)[:, None]
    logits[index] = x - (freq * counts + presence * (counts > 0))


def token_counts(lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(lists), vocab] fp32: how often each token occurs in each list; one host-to-device
    copy and one scatter for all rows (per row, a step paid ~8 launches and two copies)."""
    lengths = [len(ids) for ids in lists]
    flat = np.fromiter(itertools.chain.from_iterable(lists), np.int64, sum(lengths))
    flat += np.repeat(np.arange(len(lists), dtype=np.int64) * vocab, lengths)
    counts = torch.zeros(len(lists) * vocab, device=device)
    if flat.size:
        index = host_values(flat, torch.long, device)
        counts.index_add_(0, index, torch.ones(flat.size, device=device))
    return counts.view(len(lists), vocab)


def apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        p = row.params
        if row.num_output_tokens < p.min_tokens:
            # EOS too under ignore_eos (as vLLM): min_tokens means no early end of any kind
            banned = set(p.stop_token_ids) | set(p.all_stop_token_ids)
            if banned:  # (index_fill_: the value goes to the kernel, not copied from the host)
                index = host_values(sorted(banned), torch.long, logits.device)
                logits[i].index_fill_(0, index, float("-inf"))


def apply_top_k_top_p_min_p(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """min_p on the whole distribution first, then top-k and top-p on what is left (the
    order of vLLM's V1 sampler: top-p renormalises, so the order matters). Cuts are by
    value, as the GPU kernel's (kernels/sampling.py): every token tied with the k-th
    largest, or with the last one top-p keeps, stays. The CPU path: no sort of whole rows
    (48 rows of 49,152: 140 ms), ``topk`` candidates instead (``_nucleus_floor``)."""
    device, vocab = logits.device, logits.shape[1]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    if any(m > 0 for m in min_p):
        probs = logits.softmax(dim=-1)
        threshold = host_values(min_p, probs.dtype, device)[:, None]
        logits = logits.masked_fill(
            probs < threshold * probs.max(dim=-1, keepdim=True).values, float("-inf")
        )
    ks = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in rows]
    if any(ks):
        k = host_values(ks, torch.long, device)[:, None]
        kth = logits.topk(max(ks), dim=-1).values.gather(1, (k - 1).clamp(min=0))
        logits = logits.masked_fill((logits < kth) & (k > 0), float("-inf"))
    # top_p 1 is off: an fp32 cumulative sum can reach 1 before the tail by rounding, and
    # cut it from a row only because another row of the batch filters
    cut = [i for i, p in enumerate(top_p) if p < 1.0]
    if cut:
        index = host_values(cut, torch.long, device)
        some = logits[index]
        floor = _nucleus_floor(some, host_values([top_p[i] for i in cut], some.dtype, device))
        logits = logits.index_copy(0, index, some.masked_fill(some < floor, float("-inf")))
    return logits


def _nucleus_floor(logits: torch.Tensor, top_p: torch.Tensor, width: int = 256) -> torch.Tensor:
    """[rows, 1]: the smallest logit top-p keeps, the last (largest first) whose better-
    ranked mass is under top_p (the best always: a top_p under fp32's range reads as 0).
    From the largest ``width`` logits; a row whose nucleus may reach past them (a flat
    distribution) sorts its whole row."""
    lse = logits.logsumexp(dim=-1, keepdim=True)
    largest = logits.topk(min(width, logits.shape[1]), dim=-1).values  # largest first
    last = _last_kept(largest, lse, top_p)
    floor = largest.gather(1, last)
    wide = (last[:, 0] == largest.shape[1] - 1).nonzero()[:, 0]
    if len(wide) and largest.shape[1] < logits.shape[1]:
        ordered = logits[wide].sort(dim=-1, descending=True).values
        floor[wide] = ordered.gather(1, _last_kept(ordered, lse[wide], top_p[wide]))
    return floor


def _last_kept(largest: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[rows, 1]: the index of the last of ``largest`` (descending) whose better-ranked mass
    is under top_p, the first if none."""
    probs = (largest - lse).exp()
    kept = probs.cumsum(dim=-1) - probs < top_p[:, None]
    return (kept.sum(dim=-1, keepdim=True) - 1).clamp(min=0)


def seeded_uniform(row: SamplingRow) -> float:
    """A seeded row's uniform for its next token on the CPU: the same whatever the batch.
    NOTE: not torch's CPU generator, whose ``manual_seed`` keeps the low 32 bits only: seeds
    2**32 apart (0 and 2**32, -1 and 2**32 - 1) drew the same tokens."""
    return float(np.random.default_rng((row.seed % 2**64, row.num_output_tokens)).random())


def inverse_cdf_sample(
    probs: torch.Tensor, rows: list[SamplingRow], generator: torch.Generator | None
) -> torch.Tensor:  # [rows, vocab] -> [rows]
    """Per row, the first token whose cumulative probability passes one uniform draw. On
    the CPU, where an exponential variate per vocabulary entry is slow (48 x 49152 fp32:
    44 ms, 2 cores), this takes a few ms; float64 keeps the sums exact enough."""
    u = torch.rand(len(rows), dtype=torch.float64, generator=generator, device=probs.device)
    for i, row in enumerate(rows):
        if row.seed is not None:
            u[i] = seeded_uniform(row)
    cdf = probs.to(torch.float64, copy=True).cumsum_(dim=-1)  # (never the caller's probs)
    target = (u * cdf[:, -1])[:, None]  # (the mass sums to 1 within rounding)
    # (right=True: past any flat run, i.e. never a token of probability zero)
    ids = torch.searchsorted(cdf, target, right=True)[:, 0]
    # a NaN row (no finite logit): token 0, as argmax gives (greedy, the GPU's race)
    return ids.masked_fill_(target[:, 0].isnan(), 0).clamp_(max=probs.shape[1] - 1)


class RowStaging:
    """Per row, a Philox key and four fp32 settings, on the device in one copy from pinned
    memory (pinning a new buffer every step cost more than the sampling kernel). Two
    buffers alternate: one is written again only once its last copy has run."""

    def __init__(self) -> None:
        self.host = [torch.empty(0, 3, dtype=torch.int64), torch.empty(0, 3, dtype=torch.int64)]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def copy(self, keys: np.ndarray, settings: list[tuple], device: torch.device) -> torch.Tensor:
        n, self.turn = len(keys), self.turn ^ 1
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()  # (long done, unless the GPU is 2 steps behind)
        if self.host[self.turn].shape[0] < n:
            self.host[self.turn] = torch.empty(max(n, 256), 3, dtype=torch.int64, pin_memory=True)
        rows = self.host[self.turn].numpy()[:n]
        rows[:, 0] = keys
        rows[:, 1:].view(np.float32)[:] = settings
        out = self.host[self.turn][:n].to(device, non_blocking=True)
        self.copied[self.turn] = torch.cuda.Event()
        self.copied[self.turn].record()
        return out


class Sampler:
    def __init__(
        self, device: torch.device, seed: int, vocab: int = 0, dtype: torch.dtype = torch.float32
    ) -> None:
        """On a GPU, given the logits' width and dtype, the sampling and argmax kernels are
        compiled now for them and for fp32 (rows whose logits are edited), not in the first
        sampled step (~1-2 s on a fresh Triton cache)."""
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.race_seeds = np.random.default_rng(seed)  # unseeded rows' keys on a GPU
        self.staging = RowStaging()
        self.json_masks: JsonMasks | None = None  # the engine's, made at its first JSON request
        self.regex_masks: RegexMasks | None = None  # (at its first guided_regex request)
        self.grammar_masks: GrammarMasks | None = None  # (at its first guided_grammar request)
        # Greedy rows on a GPU: ``kernels.argmax``'s per-row arrival counts (zeros between
        # launches, all on this sampler's stream).
        self._argmax_counts = None
        if device.type == "cuda":
            from kernels.argmax import MAX_ROWS

            self._argmax_counts = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
        if device.type == "cuda" and vocab:
            from kernels.sampling import sample_rows

            params = torch.tensor([[1.0, 0.5, 0.0, 2.0]], device=device)
            for d in {dtype, torch.float32}:
                sample_rows(torch.zeros(1, vocab, dtype=d, device=device), params,
                            torch.zeros(1, dtype=torch.int64, device=device))  # fmt: skip
                self.greedy(torch.zeros(1, vocab, dtype=d, device=device))

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow] | None) -> SamplerOutput:
        sampled, raw_logprobs = self.sample(logits, rows)
        token_ids = sampled.tolist()  # the step's one device-to-host copy of sampled ids
        if rows is None:
            return SamplerOutput(token_ids, [None] * len(token_ids))
        return SamplerOutput(token_ids, self._logprobs(raw_logprobs, rows, sampled, token_ids))

    def sample(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow] | None,
        pending: torch.Tensor | None = None,  # see apply_penalties
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampled ids on the device (no host sync), and raw logprobs when any row asks.
        ``rows=None`` means every row is plain greedy (no penalties, min_tokens or logprobs):
        the argmax alone, with no per-row host work."""
        if rows is None:
            return self.greedy(logits), None  # exact in any dtype: no fp32 copy needed
        raw_logprobs = None
        extras = [r for r in rows if r.has_extras]  # (one pass; most rows have none)
        if any(r.params.logprobs is not None for r in extras):
            raw_logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
        bias = any(r.params.logit_bias for r in extras)
        allowed = any(r.params.allowed_token_ids for r in extras)
        words = any(r.params.bad_words_token_ids for r in extras)
        penalised = any(r.params.has_penalties for r in extras)
        held = any(r.num_output_tokens < r.params.min_tokens for r in extras)
        guided = any(r.params.guided_choice_token_ids for r in extras)
        json_rows = any(r.params.json_object for r in extras)
        regex_rows = any(r.params.guided_pattern for r in extras)
        grammar_rows = any(r.params.guided_grammar for r in extras)
        masked = json_rows or regex_rows or grammar_rows
        edited = bias or allowed or words or penalised or held or guided or masked
        if edited or not logits.is_cuda:
            logits = logits.float()  # [num_rows, vocab] (else the kernel reads the logits)
        if bias:
            apply_logit_bias(logits, rows)
        if allowed:
            apply_allowed_token_ids(logits, rows)
        if words:
            ban_bad_words(logits, rows, pending)
        if penalised:
            apply_penalties(logits, rows, pending)
        if held:
            apply_min_tokens(logits, rows)
        if guided:
            apply_guided_choice(logits, rows, pending)
        if json_rows:
            apply_json_object(logits, rows, self.json_masks)
        if regex_rows:
            apply_guided_regex(logits, rows, self.regex_masks)
        if grammar_rows:
            apply_guided_grammar(logits, rows, self.grammar_masks)
        if all(r.params.greedy for r in rows):
            sampled = self.greedy(logits)
        elif logits.is_cuda:
            sampled = self._race_on_device(logits, rows)
        else:
            # NOTE: at most fp32's largest: a valid temperature beyond it is inf there, and
            # a banned token's -inf / inf is NaN, which made the whole row draw token 0
            temps = host_values(
                [1.0 if r.params.greedy else min(r.params.temperature, FP32_MAX) for r in rows],
                torch.float32,
                logits.device,
            )[:, None]
            # NOTE: a row whose largest logit overflows fp32 over its temperature (past 3.4e36
            # at 0.01) is shifted by it first, as the GPU kernel scales x - best: its inf made
            # the row NaN, and token 0 was drawn. Other rows are divided as they are (a shift
            # rounds logits near 0 together, and the cuts are by value).
            best = logits.amax(dim=-1, keepdim=True)
            shift = best.where((best / temps).isinf() & best.isfinite(), 0.0)
            scaled = apply_top_k_top_p_min_p((logits - shift) / temps, rows)
            random_ids = inverse_cdf_sample(scaled.softmax(dim=-1), rows, self.generator)
            is_greedy = host_values([r.params.greedy for r in rows], torch.bool, logits.device)
            sampled = torch.where(is_greedy, self.greedy(logits), random_ids)
        return sampled, raw_logprobs

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:  # [rows, vocab] -> [rows]
        """``logits.argmax(-1)``; a few rows on a GPU in one launch (``kernels.argmax``:
        torch reduces a lone row in one thread block)."""
        from kernels.argmax import DTYPES, MAX_ROWS, argmax_rows

        rows = logits.shape[0]
        fits = logits.stride(1) == 1 and logits.dtype in DTYPES  # (else the kernel asserts)
        if self._argmax_counts is not None and 0 < rows <= MAX_ROWS and fits:
            return argmax_rows(logits, self._argmax_counts)
        return logits.argmax(dim=-1)

    def _race_on_device(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Every row in one kernel; its Philox key and settings reach the device in one copy."""
        from kernels.sampling import sample_rows

        keys = self.race_seeds.integers(0, 2**63, len(rows))  # unseeded rows'
        for i, r in enumerate(rows):
            if r.seed is not None:
                key = race_key(r)
                keys[i] = key - 2**64 if key >= 2**63 else key
        settings = [r.race_settings for r in rows]
        staged = self.staging.copy(keys, settings, logits.device)  # [rows, 3] int64
        return sample_rows(logits, staged[:, 1:].view(torch.float32), staged[:, 0])

    @staticmethod
    def _logprobs(
        raw: torch.Tensor | None, rows: list[SamplingRow], sampled: torch.Tensor, ids: list[int]
    ):
        if raw is None:
            return [None] * len(rows)
        chosen, top_vals, top_ids = logprob_tensors(raw, rows, sampled)
        return logprob_entries(rows, ids, chosen.tolist(), top_vals.tolist(), top_ids.tolist())


def race_key(row: SamplingRow) -> int:
    """A seeded row's Philox key for its next token: the same whatever the batch."""
    # NOTE: mod 2**64, so any Python int seed is valid and none changes meaning
    return (row.seed * _SEED_STRIDE + row.num_output_tokens) % 2**64
