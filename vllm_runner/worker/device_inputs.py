"""Persistent step-input buffers: pinned host staging -> device, no per-step allocation.

Also the static inputs that CUDA graphs replay from: a decode batch of ``num_reqs`` rows is
padded to a captured bucket size with rows that write nothing (slot -1) and read nothing
(seq_len 0); a mixed step's input ids are padded to a piecewise graph's token count (its
attention reads only the step's own tokens).
"""

import math

import numpy as np
import torch

from vllm_runner.model.layers.attention import AttentionMetadata
from vllm_runner.worker.input_batch import StepInputs

_FIELDS = {  # name -> dtype, rows (T: token rows, R: request rows), in arena order
    "input_ids": (torch.int64, "T"),
    "positions": (torch.int64, "T"),
    "slot_mapping": (torch.int64, "T"),
    "logits_indices": (torch.int64, "R"),
    "patch_dst": (torch.int64, "R"),
    "patch_src": (torch.int64, "R"),
    "seq_lens": (torch.int32, "R"),
    "query_start_loc": (torch.int32, "R+1"),
    "decode_order": (torch.int32, "R"),
    "block_tables": (torch.int32, "R x blocks"),
}
_ALIGN = 16  # bytes: every field starts 16-byte aligned (vectorized kernel loads)
assert next(iter(_FIELDS)) == "input_ids"  # at offset 0 in every layout (``token_ids``)


# With LoRA: each token's adapter slot (-1: none), second, so that its offset too depends on
# the token count alone (a piecewise graph's step of any request count copies it from there)
_LORA_FIELDS = {"input_ids": _FIELDS["input_ids"], "lora_slots": (torch.int64, "T"), **_FIELDS}


def _layout(
    tokens: int, reqs: int, max_blocks: int, fields: dict = _FIELDS
) -> tuple[dict[str, tuple], int]:
    """Byte offset and shape of each field for a step of ``tokens`` / ``reqs`` rows, packed
    one after another, and the bytes they span."""
    rows = {"T": (tokens,), "R": (reqs,), "R+1": (reqs + 1,), "R x blocks": (reqs, max_blocks)}
    slots, end = {}, 0
    for name, (dtype, kind) in fields.items():
        shape = rows[kind]
        slots[name] = (end, shape, dtype)
        end += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    return slots, end


class DeviceInputs:
    """A step's inputs are packed into one pinned host buffer and reach the device in one
    copy (a small pinned copy costs the GPU ~2.5 us; a decode step had nine). The layout
    depends only on the step's token and request row counts, so a decode graph of a bucket
    size reads its inputs at the same addresses on every replay.

    Two host buffers alternate between steps: while step N's copy may still be queued on
    the GPU, step N + 1 stages into the other, and a buffer is staged again only once its
    last copy has run (an event per buffer). Async scheduling's wait for step N - 1 does not
    cover it: a step that samples nothing (a prompt chunk) has nothing to wait for, so
    behind a long prefill the host could otherwise restage a buffer whose copy was still
    queued, and that step would read another's inputs."""

    def __init__(
        self,
        max_tokens: int,
        max_reqs: int,
        max_blocks: int,
        device: torch.device,
        lora_slots: torch.Tensor | None = None,
    ) -> None:
        """``lora_slots``: with LoRA, the persistent per-token slot tensor the LoRA layers
        read (``lora.layers.LoRASlots``): each step's slots are staged with its other inputs
        and copied there, padding tokens -1."""
        self.pin = device.type == "cuda"
        self.max_blocks = max_blocks
        self.lora_slots = lora_slots
        self.fields = _FIELDS if lora_slots is None else _LORA_FIELDS
        size = _layout(max_tokens, max_reqs, max_blocks, self.fields)[1]
        self.hosts = [
            torch.zeros(size, dtype=torch.uint8, pin_memory=self.pin)
            for _ in range(2 if self.pin else 1)
        ]
        # On CPU the staging buffer is the input buffer itself.
        self.arena = (
            torch.zeros(size, dtype=torch.uint8, device=device) if self.pin else self.hosts[0]
        )
        self._views: dict[tuple[int, int], tuple[int, dict, list[dict]]] = {}
        self._turn = 0
        # per host buffer, recorded after its copy (never recorded: synchronize returns)
        self._copied = [torch.cuda.Event() for _ in self.hosts] if self.pin else None

    def _entry(self, tokens: int, reqs: int) -> tuple[int, dict, list[dict]]:
        """(bytes, device views, numpy views of each host buffer) of a layout, cached."""
        key = (tokens, reqs)
        if key not in self._views:
            if len(self._views) >= 256:  # prefill steps come in many sizes
                self._views.clear()
            slots, end = _layout(tokens, reqs, self.max_blocks, self.fields)

            def views(buf: torch.Tensor) -> dict[str, torch.Tensor]:
                return {
                    name: buf[off : off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                    for name, (off, shape, dtype) in slots.items()
                }

            hosts = [{n: t.numpy() for n, t in views(h).items()} for h in self.hosts]
            self._views[key] = (end, views(self.arena), hosts)
        return self._views[key]

    def views(self, tokens: int, reqs: int) -> dict[str, torch.Tensor]:
        """Device views of every field for a step of ``tokens`` / ``reqs`` rows: the static
        inputs a decode graph of that batch size reads."""
        return self._entry(tokens, reqs)[1]

    def token_ids(self, tokens: int) -> torch.Tensor:
        """The device view of the input ids of any step of ``tokens`` token rows: they come
        first in every layout, so a piecewise graph of that many tokens reads them at one
        address whatever the step's request count."""
        return self.views(tokens, 1)["input_ids"]

    def load(
        self,
        inputs: StepInputs,
        pad_reqs: int = 0,
        prev_sampled: torch.Tensor | None = None,
        prev_rows: dict[str, int] | None = None,
        pad_tokens: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Device views of this step's inputs. With ``pad_reqs`` (decode graphs), every
        per-token and per-request array is padded to that many rows; with ``pad_tokens``
        (piecewise graphs), the input ids alone, with id 0. Input tokens still on the device
        (``inputs.missing``) are copied from ``prev_sampled`` there."""
        qsl = inputs.query_start_loc
        num_tokens, num_reqs = int(qsl[-1]), len(qsl) - 1
        end, dev, hosts = self._entry(
            max(num_tokens, pad_reqs, pad_tokens), max(num_reqs, pad_reqs)
        )
        turn = self._turn
        host, host_buffer = hosts[turn], self.hosts[turn]
        self._turn = (turn + 1) % len(self.hosts)
        if self.pin:
            self._copied[turn].synchronize()  # (normally long done: returns at once)
        lengths = {}

        def put(name: str, array: np.ndarray, pad_to: int = 0, fill: int = 0) -> None:
            n = len(array)
            rows = max(n, pad_to)
            if array.ndim == 1:
                host[name][:n] = array
                host[name][n:rows] = fill
            else:  # rows and columns past the step's own are zeroed (no other field's bytes)
                host[name][:n, : array.shape[1]] = array
                host[name][:n, array.shape[1] :] = 0
                host[name][n:rows] = 0
            lengths[name] = rows

        put("input_ids", inputs.input_ids, max(pad_reqs, pad_tokens))
        if self.lora_slots is not None:
            slots = inputs.lora_slots if inputs.lora_slots is not None else np.empty(0, np.int64)
            put("lora_slots", slots, lengths["input_ids"], fill=-1)
        if inputs.missing:
            put("patch_dst", np.fromiter((i for i, _ in inputs.missing), np.int64))
            put("patch_src", np.fromiter((prev_rows[r] for _, r in inputs.missing), np.int64))
        put("positions", inputs.positions, pad_reqs)
        put("slot_mapping", inputs.slot_mapping, pad_reqs, fill=-1)
        put("block_tables", inputs.block_tables, pad_reqs)
        put("seq_lens", inputs.seq_lens, pad_reqs)
        put("query_start_loc", qsl, pad_reqs + 1 if pad_reqs else 0, fill=int(qsl[-1]))
        # The decode rows, longest context first; padding rows (seq_len 0) last.
        d = inputs.num_decode_rows
        order = np.argsort(-inputs.seq_lens[:d], kind="stable")
        put("decode_order", np.concatenate([order, np.arange(d, max(d, pad_reqs))]))
        put("logits_indices", inputs.logits_indices)
        if self.pin:
            self.arena[:end].copy_(host_buffer[:end], non_blocking=True)
            self._copied[turn].record()
        v = {name: dev[name][:rows] for name, rows in lengths.items()}
        if self.lora_slots is not None:
            self.lora_slots[: lengths["lora_slots"]].copy_(v["lora_slots"])
        input_ids = v["input_ids"]
        if inputs.missing:
            input_ids.index_copy_(0, v["patch_dst"], prev_sampled[v["patch_src"]])
        md = AttentionMetadata(
            slot_mapping=v["slot_mapping"],
            block_tables=v["block_tables"],
            seq_lens=v["seq_lens"],
            query_start_loc=v["query_start_loc"],
            max_query_len=inputs.max_query_len,
            max_seq_len=inputs.max_seq_len,
            num_decode_rows=inputs.num_decode_rows,
            fused_decode=inputs.fused_decode,
            # one row needs no order (the kernel then skips a dependent load)
            decode_order=v["decode_order"] if lengths["decode_order"] > 1 else None,
        )
        if 0 < d < num_reqs:  # a mixed step: CUDA's attention splits it there
            md.prefill_query_start_loc = v["query_start_loc"][d : num_reqs + 1] - d
        return input_ids, v["positions"], md, v["logits_indices"]
