"""The torch reference's paged attention (the CPU path) vs dense attention per request."""

import torch
from kernel_testing import int32, make_paged_kv, query_start_loc

from kernels import reference


def _dense(query, k_cache, v_cache, table, seq_len, q_len, scale):
    """One request in float64: its cache rows gathered slot by slot, causal softmax."""
    block = k_cache.shape[1]
    slots = [int(table[p // block]) * block + p % block for p in range(seq_len)]
    k = k_cache.reshape(-1, *k_cache.shape[2:])[slots].double()  # [ctx, kv_heads, d]
    v = v_cache.reshape(-1, *v_cache.shape[2:])[slots].double()
    group = query.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", query.double(), k) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_decode_rows_of_very_different_lengths_and_a_prefill():
    """Decode rows attend in groups of like length (each padded to its group's longest):
    every row as its own dense attention, beside a chunked prefill in the same step."""
    torch.manual_seed(0)
    seq_lens, q_lens = [3, 700, 41, 1500, 90, 2, 260, 64], [1, 1, 1, 1, 1, 1, 5, 1]
    k_cache, v_cache, tables = make_paged_kv(seq_lens, 2, 16, 16, torch.float32, "cpu")
    query = torch.randn(sum(q_lens), 6, 16)
    scale = 16**-0.5
    for q_lens_case in (q_lens, [1] * len(seq_lens)):  # mixed step, then decode only
        q = query[: sum(q_lens_case)]
        out = reference.paged_attention(
            q, k_cache, v_cache, tables, int32(seq_lens, "cpu"),
            query_start_loc(q_lens_case, "cpu"), scale,
        )  # fmt: skip
        start = 0
        for r, (n, q_len) in enumerate(zip(seq_lens, q_lens_case, strict=True)):
            expected = _dense(
                q[start : start + q_len], k_cache, v_cache, tables[r], n, q_len, scale
            )
            torch.testing.assert_close(out[start : start + q_len], expected.float())
            start += q_len
