"""Every decode-kernel (and split-reduce) variant a mixed step can launch is one
DecodeGraphs.warm_up compiled (CPU: the Triton launches are recorded, not run)."""

import pytest
import torch
from torch import nn

import kernels.attention as ka
import kernels.decode_splits as ds
import kernels.paged_attention as pa
from vllm_runner.model.layers import attention as la
from vllm_runner.worker.cuda_graphs import DecodeGraphs
from vllm_runner.worker.device_inputs import DeviceInputs

H, KV, D, BS = 32, 8, 128, 16


class _Recorder:
    def __init__(self):
        self.seen = set()

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.seen.add((kw.get("ORDERED", False), kw["SPLIT"], kw["ROPE"]))

        return launch


class _ReduceRecorder:
    def __init__(self):
        self.seen = set()

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.seen.add(kw["BLOCK_S"])

        return launch


class _AttnOnly(nn.Module):
    def __init__(self, cache):
        super().__init__()
        self.cache = cache

    def forward(self, ids, positions):
        md = la._metadata
        q = torch.zeros(len(ids), H, D)
        ka.paged_attention(
            q,
            self.cache,
            self.cache,
            md.block_tables,
            md.seq_lens,
            md.query_start_loc,
            D**-0.5,
            md.max_query_len,
            md.max_seq_len,
            md.num_decode_rows,
            None,
            md.decode_order,
        )
        return q

    def compute_logits(self, h, out=None):
        return h


@pytest.mark.parametrize("max_model_len", [4096, 16384])
@pytest.mark.parametrize("max_num_seqs", [1, 8, 256])
def test_warm_up_compiles_every_mixed_step_variant(monkeypatch, max_num_seqs, max_model_len):
    rec = _Recorder()
    monkeypatch.setattr(pa, "_decode_kernel", rec)
    reduce = _ReduceRecorder()
    monkeypatch.setattr(ds, "_decode_reduce_kernel", reduce)
    monkeypatch.setattr(ka, "prefill_attention", lambda *a, **k: None)
    max_blocks = max_model_len // BS
    cache = torch.zeros(4, BS, KV, D)
    buffers = DeviceInputs(512, max_num_seqs, max_blocks, torch.device("cpu"))
    graphs = DecodeGraphs(_AttnOnly(cache), buffers, max_num_seqs, max_model_len)
    graphs.warm_up()
    compiled, reduces = set(rec.seen), set(reduce.seen)
    rec.seen.clear()
    reduce.seen.clear()
    for d in range(1, max_num_seqs + 1):  # a mixed step's decode rows, as kernels.attention
        for max_seq_len in (2, 64, 65, 1000, max_model_len):
            order = torch.arange(d, dtype=torch.int32)
            pa.paged_attention_decode(
                torch.zeros(d, H, D),
                cache,
                cache,
                torch.zeros(d, max_blocks, dtype=torch.int32),
                torch.ones(d, dtype=torch.int32),
                D**-0.5,
                max_seq_len=max_seq_len,
                order=order,
            )
    assert rec.seen <= compiled, f"compiled mid-serving: {rec.seen - compiled}"
    assert reduce.seen <= reduces, f"split reduce compiled mid-serving: {reduce.seen - reduces}"
    assert reduce.seen == ({64, 128} if max_model_len > 64 * 64 else {64})
