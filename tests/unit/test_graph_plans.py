"""What the decode and piecewise graphs capture, warm up and replay, on CPU: torch.cuda's
graph calls are replaced by recorders, so each test reads the exact plan (sizes, order,
memory pools, the static inputs each call saw) that a GPU start-up would follow."""

import contextlib

import pytest
import torch
from torch import nn

from vllm_runner.model.layers import attention as la
from vllm_runner.worker.cuda_graphs import DecodeGraphs, graph_output_bytes
from vllm_runner.worker.device_inputs import DeviceInputs
from vllm_runner.worker.piecewise_graphs import PiecewiseGraphs

MAX_MODEL_LEN, VOCAB = 64, 5


class _Graph:
    """A CUDA graph stand-in: remembers the calls made while it was captured; a replay
    logs them again under its name."""

    def __init__(self, log: list) -> None:
        self.log, self.calls = log, []

    def pool(self) -> tuple:
        return ("pool of", self.calls[0])

    def replay(self) -> None:
        self.log.append(("replay", *self.calls))


@pytest.fixture
def fake_cuda(monkeypatch) -> list:
    """Every call the graphs make, in order; captures as ("capture", pool, calls)."""
    log: list = []

    @contextlib.contextmanager
    def graph(g: _Graph, pool: tuple | None = None):
        start = len(log)
        yield
        g.calls = log[start:]
        del log[start:]
        log.append(("capture", pool, *g.calls))

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: _Graph(log))
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    return log


class _Decoder(nn.Module):
    """Logs each forward with the static inputs its attention would read."""

    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        md = la._metadata
        self.log.append(
            (
                len(ids),
                md.fused_decode,
                md.max_seq_len,
                md.slot_mapping.tolist(),
                md.seq_lens.tolist(),
                md.query_start_loc.tolist(),
                md.decode_order.tolist(),
            )
        )
        return torch.arange(len(ids) * VOCAB, dtype=torch.float32).view(len(ids), VOCAB)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        return hidden + 1


def _decode_graphs(log: list, max_num_seqs: int) -> DecodeGraphs:
    buffers = DeviceInputs(32, max_num_seqs, 4, torch.device("cpu"))
    for view in buffers.views(max_num_seqs, max_num_seqs).values():
        view.fill_(7)  # a previous step's inputs: every warm-up and capture must blank them
    return DecodeGraphs(_Decoder(log), buffers, max_num_seqs, MAX_MODEL_LEN)


def _blank(size: int, fused: bool, max_seq_len: int) -> tuple:
    rows = list(range(size))
    return size, fused, max_seq_len, [-1] * size, [0] * size, [*rows, size], rows


def test_decode_capture_goes_largest_first_in_one_pool_on_blank_inputs(fake_cuda, caplog):
    graphs = _decode_graphs(fake_cuda, max_num_seqs=4)
    with caplog.at_level("INFO", logger="vllm_runner.worker.cuda_graphs"):
        graphs.capture()
    assert "captured 3 decode CUDA graphs (batch 1..4) in " in caplog.text
    want, pool = [], None
    for size in (4, 2, 1):
        call = _blank(size, True, MAX_MODEL_LEN)  # (graphs serve fused_decode steps only)
        want += [call, ("capture", pool, call)]  # a warm-up outside the capture first
        pool = ("pool of", call)
    assert fake_cuda == want
    assert sorted(graphs.graphs) == [1, 2, 4] and graphs.capture_seconds > 0


def test_a_replay_reads_the_rows_of_the_batch_from_its_buckets_graph(fake_cuda):
    graphs = _decode_graphs(fake_cuda, max_num_seqs=4)
    graphs.capture()
    fake_cuda.clear()
    logits = graphs.run(4, 3)
    assert fake_cuda == [("replay", _blank(4, True, MAX_MODEL_LEN))]
    assert logits.tolist() == [[1.0 + VOCAB * r + c for c in range(VOCAB)] for r in range(3)]


def test_an_eager_decode_step_returns_one_row_a_request_not_the_padding():
    """enforce_eager: the padded call runs without a graph; its pad rows must not reach the
    sampler (the runner samples every returned row when each request samples)."""
    log: list = []
    graphs = _decode_graphs(log, max_num_seqs=8)
    assert graphs.run(4, 3).shape == (3, VOCAB)
    assert [call[0] for call in log] == [4]


@pytest.mark.parametrize(
    ("max_num_seqs", "sizes"),
    [
        (20, [(1, MAX_MODEL_LEN), (1, 1), (2, MAX_MODEL_LEN), (2, 1), (20, MAX_MODEL_LEN)]),
        (1, [(1, MAX_MODEL_LEN), (1, 1)]),  # one bucket: also the one-key-tile variant
    ],
)
def test_warm_up_runs_the_unfused_variants_on_blank_inputs(max_num_seqs, sizes):
    log: list = []
    _decode_graphs(log, max_num_seqs).warm_up()
    want = [_blank(size, False, max_len)[:3] for size, max_len in sizes]
    assert [call[:3] for call in log] == want
    assert all(call[3:] == _blank(call[0], False, 0)[3:] for call in log)


def test_decode_graph_output_bytes_follow_the_dtype():
    # one [largest bucket, vocab] output: 20 rows (buckets 1, 2, 4, 8, 16, 20)
    assert graph_output_bytes(20, 1000, torch.float32) == 20 * 1000 * 4
    assert graph_output_bytes(20, 1000, torch.float16) == 20 * 1000 * 2


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_size, self.self_attn.kv_size = 4, 2
        self.input_layernorm = nn.Module()
        self.input_layernorm.weight = nn.Parameter(torch.ones(3))


class _Pieces(nn.Module):
    """A two-layer model cut in pieces; logs each piece and attention call."""

    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log
        self.layers = nn.ModuleList([_Layer(), _Layer()])

    def first_piece(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.log.append(("first", len(ids), ids.tolist()))
        return torch.full((len(ids), 8), 1.0), torch.full((len(ids), 3), 2.0)

    def next_piece(self, j: int, attn_out: torch.Tensor, residual: torch.Tensor) -> tuple:
        self.log.append(("next", j, len(attn_out), residual[0, 0].item()))
        return torch.full((len(attn_out), 8), j + 1.0), residual + 1

    def last_piece(self, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        self.log.append(("last", len(attn_out), residual[0, 0].item()))
        return residual * 10

    def attend(self, j: int, positions: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor):
        self.log.append(("attend", j, len(qkv), len(out), qkv[0, 0].item()))
        out.fill_(5.0)


def _piecewise(log: list, max_tokens: int) -> PiecewiseGraphs:
    buffers = DeviceInputs(max_tokens, 4, 4, torch.device("cpu"))
    buffers.token_ids(max_tokens).fill_(9)  # a previous step's ids: captures read zeros
    model = nn.Module()
    model.model = _Pieces(log)
    return PiecewiseGraphs(model, buffers, max_tokens)


def test_piecewise_capture_is_one_graph_a_piece_largest_first_in_one_pool(fake_cuda, caplog):
    pieces = _piecewise(fake_cuda, max_tokens=96)
    assert pieces.buckets == [64, 96]
    with caplog.at_level("INFO", logger="vllm_runner.worker.piecewise_graphs"):
        pieces.capture()
    assert "captured 6 piecewise CUDA graphs (2 token counts, 64..96) in " in caplog.text
    want, pool = [], None
    for size in (96, 64):
        calls = [
            ("first", size, [0] * size),
            ("next", 1, size, 2.0),
            ("last", size, 3.0),
        ]
        want += calls  # a warm-up outside the captures first
        for call in calls:
            want.append(("capture", pool, call))
            pool = ("pool of", call)
    assert fake_cuda == want
    assert {size: len(g) for size, g in pieces.graphs.items()} == {96: 3, 64: 3}


def test_pieces_replay_in_order_with_attention_over_the_steps_tokens_between(fake_cuda):
    pieces = _piecewise(fake_cuda, max_tokens=96)
    pieces.capture()
    fake_cuda.clear()
    positions = torch.arange(50)
    got = {n: pieces.bucket_for(n) for n in (1, 50, 64, 65, 96, 97)}
    assert got == {1: 64, 50: 64, 64: 64, 65: 96, 96: 96, 97: None}
    pieces.run(64, 50, positions)
    assert fake_cuda == [
        ("replay", ("first", 64, [0] * 64)),
        ("attend", 0, 50, 50, 2.0),  # (the capture's qkv: fake replays do no work)
        ("replay", ("next", 1, 64, 2.0)),
        ("attend", 1, 50, 50, 2.0),
        ("replay", ("last", 64, 3.0)),
    ]


def test_eager_pieces_pass_each_layers_output_to_the_next():
    log: list = []
    pieces = _piecewise(log, max_tokens=96)
    pieces.buffers.token_ids(64)[:50] = 3
    hidden = pieces.run(64, 50, torch.arange(50))
    assert log == [
        ("first", 64, [3] * 50 + [9] * 14),
        ("attend", 0, 50, 50, 1.0),  # first piece's qkv
        ("next", 1, 64, 2.0),  # its residual
        ("attend", 1, 50, 50, 2.0),  # layer 1's qkv
        ("last", 64, 3.0),
    ]
    assert hidden.shape == (64, 3) and hidden[0].tolist() == [30.0] * 3
