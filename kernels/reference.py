"""Plain-torch references for every kernel; also the CPU execution path.

KV cache layout (per layer): ``k_cache`` / ``v_cache`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``. Token ``t`` of a request lives in
``block_table[t // block_size]`` at offset ``t % block_size``; its flat slot is
``block_id * block_size + offset``.
"""

import torch
import torch.nn.functional as F

from kernels.reference_moe import align_pairs as align_pairs  # (own file: this one's length)


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 = skip (padding)
) -> None:
    """Scatter new keys/values into the paged cache at their flat slots, in place, rounded
    to the cache's dtype (an fp8 cache saturates at its largest finite value, as the
    kernels' conversions do)."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    for new, cache in ((key, k_cache), (value, v_cache)):
        _slots_view(cache).index_copy_(0, slots, _as_stored(_round_to(new[valid], cache.dtype)))


def _round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``; into fp8 saturating first (torch before 2.12 turns values past
    the largest finite one into NaN), NaN stays NaN."""
    if dtype.itemsize == 1:
        big = torch.finfo(dtype).max
        x = x.float().clamp(-big, big)
    return x.to(dtype)


def _slots_view(cache: torch.Tensor) -> torch.Tensor:
    """[num_slots, num_kv_heads, head_dim] view of a cache; fp8 as its bytes (torch has no
    CPU index kernels for fp8)."""
    return _as_stored(cache).view(-1, *cache.shape[2:])


def _as_stored(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cache rows at ``slots`` in ``dtype`` (exact: every fp8 value is a bf16 / fp16).
    ``index_select`` copies whole rows: ~4x faster on the CPU than indexing with ``slots``
    (48 x 600 rows of 3 x 64 fp32: 1.6 vs 6.8 ms on the 2-core VM; the default model
    decodes 1.08x faster: loadtests/RESULTS.md)."""
    rows = _slots_view(cache).index_select(0, slots.reshape(-1))
    return rows.view(*slots.shape, *cache.shape[2:]).view(cache.dtype).to(dtype)


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32: context length incl. this step's tokens
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32: cumulative query lengths
    scale: float,
    sliding_window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each request's new queries over its whole cached context.

    Request ``r`` owns queries ``query_start_loc[r]:query_start_loc[r+1]``; they sit at the
    last ``q_len`` positions of its ``seq_lens[r]`` tokens, whose K/V are already in the cache.
    This one rule covers prefill, chunked prefill, prefix-cache hits and decode.

    ``sliding_window`` (0: full attention): a query at position p sees the keys at (p -
    sliding_window, p] only, as transformers' sliding-window mask (Mistral, Qwen2, Gemma).
    ``softcap`` (0: none): the scaled scores x become ``softcap * tanh(x / softcap)`` before
    the mask and the softmax (Gemma 2's attn_logit_softcapping).
    """
    num_reqs = seq_lens.shape[0]
    opts = (sliding_window, softcap)
    if num_reqs and bool((query_start_loc.diff() == 1).all()):  # a pure decode batch
        return _attend_decode(query, k_cache, v_cache, block_tables, seq_lens.long(), scale, opts)
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    q_lens = [starts[r + 1] - starts[r] for r in range(num_reqs)]
    # Single-token queries (decode) go through padded batches; longer ones one by one.
    decode = [r for r, n in enumerate(q_lens) if n == 1]
    if decode:
        rows = torch.tensor(decode, device=query.device)
        at = torch.tensor([starts[r] for r in decode], device=query.device)
        out[at] = _attend_decode(
            query[at], k_cache, v_cache, block_tables[rows], seq_lens[rows].long(), scale, opts
        )
    for r, q_len in enumerate(q_lens):
        if q_len > 1:
            q = query[starts[r] : starts[r + 1]][None]
            seq_len = seq_lens[r : r + 1].long()
            out[starts[r] : starts[r + 1]] = _attend(
                q, k_cache, v_cache, block_tables[r : r + 1], seq_len, scale, opts
            )[0]
    return out


def _attend_decode(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim]: one query token each
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,  # [num_reqs] int64
    scale: float,
    opts: tuple[int, float],  # (sliding_window, softcap)
) -> torch.Tensor:  # [num_reqs, num_heads, head_dim]
    """Rows of like context length attend together, each group padded to its own longest
    (not the batch's: a 20-token chat beside a 2,000-token one would gather 2,000 rows)."""
    lens = seq_lens.tolist()
    if max(lens) <= _group_limit(min(lens)):  # one group (e.g. a lone request): no indexing
        return _attend(query[:, None], k_cache, v_cache, block_tables, seq_lens, scale, opts)[:, 0]
    order = sorted(range(len(lens)), key=lens.__getitem__)
    out = torch.empty_like(query)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and lens[order[end]] <= _group_limit(lens[order[start]]):
            end += 1
        rows = torch.tensor(order[start:end], device=query.device)
        out[rows] = _attend(
            query[rows][:, None], k_cache, v_cache, block_tables[rows], seq_lens[rows], scale,
            opts,
        )[:, 0]  # fmt: skip
        start = end
    return out


def _group_limit(shortest: int) -> int:
    """The longest context that attends in one group with ``shortest``."""
    return 2 * shortest + 64


def _attend(
    q: torch.Tensor,  # [num_reqs, q_len, num_heads, head_dim] (same q_len for every row)
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_reqs, max_blocks]
    seq_lens: torch.Tensor,  # [num_reqs] int64
    scale: float,
    opts: tuple[int, float],  # (sliding_window, softcap)
) -> torch.Tensor:  # [num_reqs, q_len, num_heads, head_dim]
    q_len = q.shape[1]
    block_size = k_cache.shape[1]
    max_len = int(seq_lens.max())
    k_pos = torch.arange(max_len, device=q.device)
    # Gather each row's K/V token by token. Positions past a row's length read the row's own
    # position 0 instead: masked out below, and never another request's (possibly garbage)
    # slots, so nothing non-finite can leak in through a 0-probability product.
    pos = torch.where(k_pos[None, :] < seq_lens[:, None], k_pos[None, :], 0)  # [num_reqs, ctx]
    slots = block_tables.long().gather(1, pos // block_size) * block_size + pos % block_size
    k = _gather(k_cache, slots, q.dtype).transpose(1, 2)  # [reqs, kv_heads, ctx, d]
    v = _gather(v_cache, slots, q.dtype).transpose(1, 2)
    q_pos = seq_lens[:, None] - q_len + torch.arange(q_len, device=q.device)  # [num_reqs, q_len]
    window, softcap = opts
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]  # [num_reqs, q_len, ctx]
    if window:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - window
    q, allowed = q.transpose(1, 2), allowed[:, None]  # [reqs, heads, q_len, d], [reqs, 1, ...]
    if not softcap:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                             enable_gqa=True)  # fmt: skip
        return out.transpose(1, 2)
    # capped scores in fp32, the probabilities in q's dtype: as transformers' Gemma 2
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = softcap * torch.tanh(q.float() @ k.float().transpose(-1, -2) * scale / softcap)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).to(q.dtype)
    return (probs @ v).transpose(1, 2)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm, optionally fused with the residual add: returns (normed, new_residual).

    With a residual, ``new_residual = x + residual`` and the norm is taken of that sum.
    """
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf.to(x.dtype) * weight), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d]
    """SiLU of the first half times the second half (the gated MLP's activation)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim] fp32: cos half | sin half
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) rotary embedding over the first ``rotary_dim`` features."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [num_tokens, rotary_dim // 2]
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot_dim = cos.shape[-1] * 2
        x_rot, x_pass = x[..., :rot_dim].float(), x[..., rot_dim:]
        x1, x2 = x_rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
        return torch.cat((out, x_pass), dim=-1)

    return rotate(query), rotate(key)


def w8a16_linear(
    x: torch.Tensor,  # [..., K] fp32 / fp16 / bf16
    qweight: torch.Tensor,  # [N, K] int8
    scale: torch.Tensor,  # [N] fp32, per output channel
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N] in x.dtype
    """Weight-only int8 linear: ``(x @ qweight.T) * scale + bias`` accumulated in fp32, the
    scale applied to the accumulator (as the Triton kernel does), rounded once to x.dtype."""
    acc = F.linear(x.float(), qweight.float())  # [..., N] fp32
    acc = acc * scale
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype)


def int4_unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """[N, ceil(K / 8)] int32 words -> [N, K] int32 values 0..15; nibble i (bits 4i..4i+3)
    of word j is k = 8j + i."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((packed[..., None] >> shifts) & 0xF).flatten(-2)[..., :k]


def int4_dequantize(
    packed: torch.Tensor,  # [N, ceil(K / 8)] int32
    scale: torch.Tensor,  # [N, ceil(K / group_size)] fp32
    zero: torch.Tensor,  # [N, ceil(K / group_size)] uint8
    group_size: int,
    k: int,
) -> torch.Tensor:  # [N, K] fp32
    """``(q - zero) * scale``, one scale and zero per ``group_size`` inputs of a row (the
    last group may be short); exact up to the one fp32 rounding of the product."""
    q = int4_unpack(packed, k)
    z = zero.to(torch.int32).repeat_interleave(group_size, dim=-1)[..., :k]
    return (q - z).float() * scale.repeat_interleave(group_size, dim=-1)[..., :k]


def w4a16_linear(
    x: torch.Tensor,  # [..., K] fp32 / fp16 / bf16
    packed: torch.Tensor,  # [N, ceil(K / 8)] int32
    scale: torch.Tensor,  # [N, ceil(K / group_size)] fp32
    zero: torch.Tensor,  # [N, ceil(K / group_size)] uint8
    group_size: int,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N] in x.dtype
    """Weight-only int4 linear: ``x @ int4_dequantize(...).T + bias`` in fp32, rounded once to
    x.dtype (the Triton kernel scales each group's partial product instead: the same sum up
    to fp32 rounding)."""
    w = int4_dequantize(packed, scale, zero, group_size, x.shape[-1])
    acc = F.linear(x.float(), w)
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype)


def fp8_quantize_rows(
    x: torch.Tensor,  # [..., K] float
) -> tuple[torch.Tensor, torch.Tensor]:  # (float8_e4m3fn [..., K], fp32 scale [...])
    """Symmetric per-row e4m3 quantization along the last dim: ``x ~ q * scale[..., None]``
    with ``scale = max(amax(|row|) / 448, 1e-12)`` (a row: a token or an output channel)."""
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / fp8_max).clamp(min=1e-12)
    q = (xf / scale[..., None]).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn)
    return q, scale


def w8a8_fp8_linear(
    x: torch.Tensor,  # [M, K] float
    qweight: torch.Tensor,  # [N, K] float8_e4m3fn
    w_scale: torch.Tensor,  # [N] fp32
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N] in x.dtype
    """fp8 W8A8 linear emulated in fp32: activations quantized per token, then both sides
    dequantized exactly and multiplied (what ``torch._scaled_mm`` with row-wise scales
    computes, up to accumulation order)."""
    xq, x_scale = fp8_quantize_rows(x)
    acc = (xq.float() * x_scale[:, None]) @ (qweight.float() * w_scale[:, None]).T
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype)


def linear_one_row(
    x: torch.Tensor,  # [1, K]
    weight: torch.Tensor,  # [N, K] (gated: [2N, K])
    bias: torch.Tensor | None = None,
    *,
    gated: bool = False,
    norm: tuple[torch.Tensor, float] | None = None,  # (RMSNorm weight [K], eps)
    residual: torch.Tensor | None = None,  # [1, N]
) -> torch.Tensor:
    """``residual + act(rms_norm(x) @ weight.T + bias)``: the unfused ops in order, each
    rounded to x's dtype, the matmul accumulated in fp32."""
    if norm is not None:
        x, _ = rms_norm(x, norm[0], norm[1])
    y = F.linear(x.float(), weight.float(), bias.float() if bias is not None else None)
    y = y.to(x.dtype)
    if gated:
        y = silu_and_mul(y)
    return y if residual is None else y + residual


def sample_rows(
    logits: torch.Tensor,  # [rows, vocab]
    params: torch.Tensor,  # [rows, 4]: temperature (0: greedy), top_p, min_p, top_k (0: off)
    uniforms: torch.Tensor,  # [rows, vocab] in (0, 1): the race's variates
) -> torch.Tensor:  # [rows] int64
    """Per row, in fp64: greedy rows the first largest logit; others keep the tokens with
    logit >= the k-th largest (all of a tie) and probability >= min_p x the largest, then
    those whose strictly more probable kept tokens hold less of the kept mass than top_p
    (all of a tie at the cut), and draw the argmax of p / q over them, q = -log(uniform)."""
    x = logits.double()
    vocab = x.shape[1]
    best = x.max(dim=-1, keepdim=True).values
    t, top_p, min_p, top_k = params.double().unbind(dim=-1)
    k = top_k.long()
    k = torch.where((k > 0) & (k < vocab), k, vocab)
    floor = x.sort(dim=-1, descending=True).values.gather(1, k[:, None] - 1)[:, 0]
    e = ((x - best) / t.clamp(min=1e-300)[:, None]).exp()
    kept = (x >= floor[:, None]) & (e >= min_p[:, None]) & (e > 0)
    mass = torch.where(kept, e, 0.0)
    xs, order = x.sort(dim=-1)  # ascending: the mass at or below each value, then above it
    at_or_below = mass.gather(1, order).cumsum(dim=-1)
    last = torch.searchsorted(xs, x, right=True) - 1
    total = at_or_below[:, -1:]  # (so nothing is above the largest: exactly 0)
    above = total - at_or_below.gather(1, last)
    nucleus = kept & ((above == 0) | (above < top_p[:, None] * total))
    key = torch.where(nucleus, e / -uniforms.double().log(), -1.0)
    drawn = key.argmax(dim=-1)
    no_finite = best[:, 0] == -torch.inf  # (token 0, as argmax gives)
    return torch.where((t == 0) | no_finite, x.argmax(dim=-1), drawn)


def moe_route(
    router_logits: torch.Tensor,  # [num_tokens, num_experts]
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fp32 weights [num_tokens, top_k], int64 ids
    """Softmax over the experts in fp32, the ``top_k`` largest, optionally rescaled to sum
    to 1 (Mixtral, Qwen3-MoE's ``norm_topk_prob``)."""
    probs = router_logits.float().softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe(
    x: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * inter, hidden]: gate rows, then up rows
    w2: torch.Tensor,  # [num_experts, hidden, inter]
    topk_weights: torch.Tensor,  # [num_tokens, top_k]
    topk_ids: torch.Tensor,  # [num_tokens, top_k] int
) -> torch.Tensor:  # [num_tokens, hidden]
    """``sum_k weight_k * down_e(silu(gate_e(x)) * up_e(x))`` over each token's experts.

    Token-expert pairs are sorted by expert, each expert's rows run as two matmuls, the
    weighted outputs go back to their pairs and sum over k in order. The CPU path of the
    MoE layer; it reads the expert counts on the host (not for CUDA graphs: that is
    ``kernels.fused_moe``)."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert, in pair order
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    rows = x.index_select(0, order // top_k)  # [num_pairs, hidden]
    out = torch.empty_like(rows)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            part = rows[start : start + count]
            out[start : start + count] = silu_and_mul(part @ w13[expert].T) @ w2[expert].T
            start += count
    pairs = torch.empty_like(out)
    pairs[order] = out * topk_weights.reshape(-1, 1)[order].to(out.dtype)
    return pairs.view(num_tokens, top_k, -1).sum(dim=1)
