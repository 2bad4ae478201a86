"""Persistent step-input buffers: pinned host staging -> device, no per-step allocation.

Also the static inputs that CUDA graphs replay from: a decode batch of ``num_reqs`` rows is
padded to a captured bucket size with rows that write nothing (slot -1) and read nothing
(seq_len 0).
"""

import numpy as np
import torch

from vllm_runner.model.layers.attention import AttentionMetadata
from vllm_runner.worker.input_batch import StepInputs

_FIELDS = {  # name -> dtype
    "input_ids": torch.int64,
    "positions": torch.int64,
    "slot_mapping": torch.int64,
    "seq_lens": torch.int32,
    "query_start_loc": torch.int32,
    "logits_indices": torch.int64,
    "patch_dst": torch.int64,
    "patch_src": torch.int64,
    "decode_order": torch.int32,
}


class DeviceInputs:
    """Two sets of pinned host buffers alternate between steps: while step N's copies may
    still be queued on the GPU, step N + 1 stages into the other set (async scheduling
    waits for step N - 1 before staging N + 1)."""

    def __init__(
        self, max_tokens: int, max_reqs: int, max_blocks: int, device: torch.device
    ) -> None:
        self.device = device
        self.pin = device.type == "cuda"
        sizes = {
            "input_ids": max_tokens,
            "positions": max_tokens,
            "slot_mapping": max_tokens,
            "seq_lens": max_reqs,
            "query_start_loc": max_reqs + 1,
            "logits_indices": max_reqs,
            "patch_dst": max_reqs,
            "patch_src": max_reqs,
            "decode_order": max_reqs,
        }

        def host_set() -> dict[str, torch.Tensor]:
            bufs = {
                n: torch.zeros(sizes[n], dtype=d, pin_memory=self.pin) for n, d in _FIELDS.items()
            }
            bufs["block_tables"] = torch.zeros(
                max_reqs, max_blocks, dtype=torch.int32, pin_memory=self.pin
            )
            return bufs

        self.hosts = [host_set(), host_set()] if self.pin else [host_set()]
        self.host = self.hosts[0]
        # On CPU the staging buffers are the inputs themselves.
        self.dev = {n: t.to(device) if self.pin else t for n, t in self.host.items()}
        self._turn = 0

    def _put(self, name: str, array: np.ndarray, pad_to: int = 0, fill: int = 0) -> torch.Tensor:
        """Stage ``array`` (padded to ``pad_to`` rows with ``fill``) and copy it to the device."""
        n = len(array)
        rows = max(n, pad_to)
        host, dev = self.host[name], self.dev[name]
        if host.dim() == 1:
            host.numpy()[:n] = array
            host.numpy()[n:rows] = fill
        else:
            host.numpy()[:n, : array.shape[1]] = array
        if self.pin:
            dev[:rows].copy_(host[:rows], non_blocking=True)
        return dev[:rows]

    def load(
        self,
        inputs: StepInputs,
        pad_reqs: int = 0,
        prev_sampled: torch.Tensor | None = None,
        prev_rows: dict[str, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Device views of this step's inputs. With ``pad_reqs`` (decode graphs), every
        per-token and per-request array is padded to that many rows. Input tokens still on
        the device (``inputs.missing``) are copied from ``prev_sampled`` there."""
        self.host = self.hosts[self._turn]
        self._turn = (self._turn + 1) % len(self.hosts)
        qsl = inputs.query_start_loc
        input_ids = self._put("input_ids", inputs.input_ids, pad_reqs)
        if inputs.missing:
            dst = np.fromiter((i for i, _ in inputs.missing), np.int64, len(inputs.missing))
            src = np.fromiter((prev_rows[r] for _, r in inputs.missing), np.int64, len(dst))
            input_ids.index_copy_(
                0, self._put("patch_dst", dst), prev_sampled[self._put("patch_src", src)]
            )
        positions = self._put("positions", inputs.positions, pad_reqs)
        # The decode rows, longest context first; padding rows (seq_len 0) last. One row needs
        # no order (the kernel ignores it): no copy (each small copy costs the GPU ~2.5 us).
        d = inputs.num_decode_rows
        order = np.argsort(-inputs.seq_lens[:d], kind="stable")
        order = np.concatenate([order, np.arange(d, max(d, pad_reqs))])
        md = AttentionMetadata(
            slot_mapping=self._put("slot_mapping", inputs.slot_mapping, pad_reqs, fill=-1),
            block_tables=self._put("block_tables", inputs.block_tables, pad_reqs),
            seq_lens=self._put("seq_lens", inputs.seq_lens, pad_reqs),
            query_start_loc=self._put(
                "query_start_loc", qsl, pad_reqs + 1 if pad_reqs else 0, fill=int(qsl[-1])
            ),
            max_query_len=inputs.max_query_len,
            max_seq_len=inputs.max_seq_len,
            num_decode_rows=inputs.num_decode_rows,
            fused_decode=inputs.fused_decode,
            decode_order=self._put("decode_order", order) if len(order) > 1 else None,
        )
        logits_indices = self._put("logits_indices", inputs.logits_indices)
        return input_ids, positions, md, logits_indices
