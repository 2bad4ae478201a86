"""The runner's adapters: an LRU of adapters loaded in CPU memory (``max_cpu_loras``), the
``max_loras`` device slots of every LoRA layer, and each step's per-token slot indices."""

import collections
import logging

import numpy as np
import torch
from torch import nn

from vllm_runner.config import LoRAConfig
from vllm_runner.lora.layers import LoRALayer, LoRASlots, layer_slices
from vllm_runner.lora.peft import LoRALimits, load_adapter
from vllm_runner.lora.request import LoRARequest
from vllm_runner.model.layers.linear import LinearBase

logger = logging.getLogger(__name__)


# one part of a layer an adapter module writes: (layer, part index, rows of the module's B)
_Part = tuple[LoRALayer, int, slice]


def lora_modules(model: nn.Module) -> dict[str, tuple[LinearBase, list[tuple[object, slice]]]]:
    """HF module path -> (our layer, [(its part's shard id, the rows of an adapter's B that
    go there)]) for every linear layer of the decoder layers: a fused layer's HF parts (q_proj
    -> qkv_proj's "q") and the fused layer itself (its B split across the parts)."""
    fused: dict[str, list[tuple[str, object]]] = collections.defaultdict(list)
    for hf_name, (ours, shard) in getattr(model, "packed_modules_mapping", {}).items():
        fused[ours].append((hf_name, shard))
    modules = {}
    for path, layer in model.named_modules():
        if not isinstance(layer, LinearBase) or ".layers." not in f".{path}":
            continue
        parts = layer_slices(layer)
        whole, row = [], 0
        for shard, (_, size) in parts.items():
            whole.append((shard, slice(row, row + size)))
            row += size
        modules[path] = (layer, whole)
        prefix, leaf = path.rsplit(".", 1)
        for hf_name, shard in fused.get(leaf, ()):
            modules[f"{prefix}.{hf_name}"] = (layer, [(shard, slice(0, parts[shard][1]))])
    return modules


class LoRAManager:
    """Never changes a Request: the runner hands it each step's requests' adapters."""

    def __init__(
        self,
        model: nn.Module,
        config: LoRAConfig,
        max_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.config, self.dtype, self.device = config, dtype, device
        self.slots = LoRASlots(max_tokens, device)
        self._parts: dict[str, list[_Part]] = {}
        shapes = {}
        for path, (layer, parts) in lora_modules(model).items():
            if layer.lora is None:
                slices = list(layer_slices(layer).values())
                layer.lora = LoRALayer(
                    layer, slices, self.slots, config.max_loras, config.max_lora_rank, dtype
                )
            index = list(layer_slices(layer))
            self._parts[path] = [(layer.lora, index.index(s), rows) for s, rows in parts]
            shapes[path] = (layer.in_features, sum(r.stop - r.start for _, r in parts))
        self.layers = {id(p[0]): p[0] for parts in self._parts.values() for p in parts}
        self.limits = LoRALimits(config.max_lora_rank, shapes)
        self._cpu: collections.OrderedDict[int, tuple[LoRARequest, dict]] = (
            collections.OrderedDict()
        )
        self._slot_of: collections.OrderedDict[int, int] = collections.OrderedDict()  # LRU

    def add(self, lora: LoRARequest) -> None:
        """Load ``lora`` into the CPU cache (now, so a bad adapter fails its request at
        once); a ValueError names what is wrong."""
        self._weights(lora)

    def _weights(self, lora: LoRARequest) -> dict:
        held = self._cpu.get(lora.lora_int_id)
        if held is not None:
            if held[0].lora_path != lora.lora_path or held[0].lora_name != lora.lora_name:
                raise ValueError(
                    f"lora_int_id {lora.lora_int_id} is adapter {held[0].lora_name!r} "
                    f"({held[0].lora_path!r}), not {lora.lora_name!r} ({lora.lora_path!r}): give "
                    "each adapter its own id"
                )
            self._cpu.move_to_end(lora.lora_int_id)
            return held[1]
        pin = self.device.type == "cuda"
        weights = {}
        for module, w in load_adapter(lora, self.limits, self.dtype).items():
            bt = w.b.T.contiguous()  # [rank, out]: rows of the slot's B
            for part in self._parts[module]:
                a, b = w.a, bt[:, part[2]].contiguous()
                weights[id(part[0]), part[1]] = (a.pin_memory(), b.pin_memory()) if pin else (a, b)
        self._cpu[lora.lora_int_id] = (lora, weights)
        while len(self._cpu) > self.config.max_cpu_loras:
            self._cpu.popitem(last=False)
        logger.info("LoRA adapter %r (id %d) loaded from %s", lora.lora_name,
                    lora.lora_int_id, lora.lora_path)  # fmt: skip
        return weights

    def step_slots(
        self, adapters: list[LoRARequest | None], counts: np.ndarray
    ) -> np.ndarray | None:
        """Each token's slot (-1: none) for a step whose requests run ``adapters`` with
        ``counts`` tokens each; the adapters are put in device slots first. None (and the
        layers skip their term) when no request has one."""
        self.slots.kept = None  # (the runner sets it for a step that prunes rows)
        slot_of: dict[int, int] = {}
        for lora in adapters:
            if lora is not None and lora.lora_int_id not in slot_of:
                slot_of[lora.lora_int_id] = -1
        self.slots.active = bool(slot_of)
        if not slot_of:
            return None
        if len(slot_of) > self.config.max_loras:  # the scheduler keeps each step within it
            raise RuntimeError(f"a step of {len(slot_of)} adapters, more than max_loras "
                               f"{self.config.max_loras}")  # fmt: skip
        for lora in adapters:
            if lora is not None and slot_of[lora.lora_int_id] < 0:
                slot_of[lora.lora_int_id] = self._activate(lora, slot_of)
        per_request = [-1 if a is None else slot_of[a.lora_int_id] for a in adapters]
        return np.repeat(np.array(per_request, np.int64), counts)

    def _activate(self, lora: LoRARequest, step: dict[int, int]) -> int:
        """The device slot holding ``lora``, copied there if it is not (into a free slot or
        the least recently used one that this step does not use)."""
        slot = self._slot_of.get(lora.lora_int_id)
        if slot is not None:
            self._slot_of.move_to_end(lora.lora_int_id)
            return slot
        weights = self._weights(lora)
        taken = set(self._slot_of.values())
        free = [s for s in range(self.config.max_loras) if s not in taken]
        if free:
            slot = free[0]
        else:
            old = next(i for i in self._slot_of if i not in step)
            slot = self._slot_of.pop(old)
        # NOTE: stream-ordered copies: a step still queued on the device reads the old weights
        for layer in self.layers.values():
            for part in range(len(layer.slices)):
                layer.set(slot, part, *weights.get((id(layer), part), (None, None)))
        self._slot_of[lora.lora_int_id] = slot
        return slot
