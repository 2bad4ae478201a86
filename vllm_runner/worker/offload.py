"""CPU weight offloading: whole decoder layers' linear weights live in (pinned) host memory and
stream into reusable device working buffers, one layer ahead of use.

Placement: offloaded layers are spread evenly over the depth (anchored at the last layer, so
layer 0 stays resident). The copy of offloaded layer j+1 is issued when layer j starts, so it
overlaps the compute of every layer up to j+1; with the last K layers contiguous it would
overlap one layer only, and a step would cost (L-K) * t_layer + K * max(t_layer, t_copy)
instead of ~max(L * t_layer, K * t_copy).

Mechanism: two working buffers (slot ``j % 2`` for offloaded layer j), each the size of the
largest packed layer. An offloaded layer's parameters are permanent views into its slot, so
the model code is unchanged; forward hooks only move bytes. On CUDA the copies run on their
own stream; per slot a ``loaded`` event gates compute and a ``free`` event (recorded after
the layer that last read the slot) gates the next copy. On CPU the same code copies
synchronously, so tests cover the logic. The count of offloaded layers is rounded up to an
even number so that the last layer can prefetch the next step's first one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import torch
from torch import nn

from vllm_runner.model.layers.linear import LinearBase
from vllm_runner.model.layers.quant import QuantMethod, quantize_module
from vllm_runner.worker import memory

logger = logging.getLogger(__name__)

GiB = 1 << 30
ALIGN = 256  # bytes; every packed tensor starts aligned for any dtype view and fast copies
NUM_SLOTS = 2


def align(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (the ModuleList named ``layers``)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            return module
    raise ValueError(f"{type(model).__name__} has no ModuleList named 'layers' to offload")


def linear_tensors(layer: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, parameter name, tensor) of every linear parameter in ``layer``, in a fixed order:
    what an offloaded layer moves (norms stay resident: they are tiny)."""
    return [
        (module, name, param)
        for module in layer.modules()
        if isinstance(module, LinearBase)
        for name, param in module._parameters.items()
        if param is not None
    ]


def packed_layer_bytes(layer: nn.Module, method: QuantMethod | None) -> int:
    """Host / working-buffer bytes of ``layer``'s linear tensors once quantized (meta is fine)."""
    total = 0
    for module, name, param in linear_tensors(layer):
        unquantized = name == "weight" and method is not None and module.quant_method is None
        if unquantized and method.supports(module):  # once quantized: weight + scales (+ zeros)
            total += sum(align(nbytes) for nbytes in method.tensor_nbytes(module))
        else:
            total += align(param.nbytes)
    return total


def choose_offload_layers(layer_bytes: list[int], offload_bytes: int) -> tuple[int, ...]:
    """Indices of the layers to offload: enough whole layers to cover ``offload_bytes``,
    rounded up to an even count, spread evenly and anchored at the last layer."""
    num_layers = len(layer_bytes)
    if offload_bytes <= 0 or num_layers == 0:
        return ()
    count = min(num_layers, math.ceil(offload_bytes / max(max(layer_bytes), 1)))
    count = min(num_layers, count + count % 2)
    return tuple(sorted(num_layers - 1 - (i * num_layers) // count for i in range(count)))


@dataclasses.dataclass(frozen=True)
class WeightPlan:
    """Where the weights go, computed from shapes before anything is loaded."""

    total_bytes: int  # every parameter, in its final (possibly quantized) format
    layer_bytes: tuple[int, ...]  # packed linear bytes per decoder layer
    offload_layers: tuple[int, ...]
    quantize_saves_bytes: int  # what int8 / fp8 would save (0 once quantized)

    @property
    def offloaded_bytes(self) -> int:
        return sum(self.layer_bytes[i] for i in self.offload_layers)

    @property
    def buffer_bytes(self) -> int:
        if not self.offload_layers:
            return 0
        slots = min(NUM_SLOTS, len(self.offload_layers))
        return slots * max(self.layer_bytes[i] for i in self.offload_layers)

    @property
    def resident_bytes(self) -> int:
        """Device bytes of weights, working buffers included."""
        return self.total_bytes - self.offloaded_bytes + self.buffer_bytes

    @property
    def floor_bytes(self) -> int:
        """Device bytes of weights with every decoder layer offloaded: what stays (embeddings,
        LM head, norms) and the working buffers."""
        if not self.layer_bytes:
            return self.total_bytes
        slots = min(NUM_SLOTS, len(self.layer_bytes))
        return self.total_bytes - sum(self.layer_bytes) + slots * max(self.layer_bytes)


def plan_weights(model: nn.Module, method: QuantMethod | None, cpu_offload_gb: float) -> WeightPlan:
    """Plan on a (meta) model: final weight bytes and the layers to offload."""
    total = saves = 0
    for name, param in model.named_parameters():  # NOTE: tied parameters come once
        prefix, _, leaf = name.rpartition(".")
        module = model.get_submodule(prefix)
        linear = isinstance(module, LinearBase)
        if leaf != "weight" or not linear or module.quant_method is not None:
            total += param.nbytes  # (a layer of a pre-quantized checkpoint: as it loads)
        elif method is not None:
            total += method.weight_nbytes(module)
        else:
            total += param.nbytes
            saves += max(param.nbytes - param.numel() - 4 * module.out_features, 0)
    try:
        layers = decoder_layers(model)
    except ValueError:
        if cpu_offload_gb > 0:
            raise
        layers = nn.ModuleList()
    layer_bytes = tuple(packed_layer_bytes(layer, method) for layer in layers)
    offload = choose_offload_layers(list(layer_bytes), int(cpu_offload_gb * GiB))
    return WeightPlan(total, layer_bytes, offload, saves)


def check_weights_fit(plan: WeightPlan, device: torch.device, utilization: float) -> None:
    """Fail at start-up, naming the bytes missing and the settings that fix it, when the
    device-resident weights alone exceed ``utilization`` of the device."""
    budget, total = memory.weight_budget(device, utilization)
    error = memory.weights_fit_error(
        plan.resident_bytes,
        budget,
        utilization=utilization,
        total_bytes=total,
        offloaded_bytes=plan.offloaded_bytes,
        floor_bytes=plan.floor_bytes,
        layer_bytes=max(plan.layer_bytes, default=0),
        quantize_saves_bytes=plan.quantize_saves_bytes,
    )
    if error is not None:
        raise ValueError(error)


class WeightOffloader:
    """Owns the host copies of the offloaded layers and the device working buffers."""

    def __init__(self, device: torch.device, slot_bytes: int, num_layers: int) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.num_slots = min(NUM_SLOTS, num_layers)
        self.buffers = [
            torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(self.num_slots)
        ]
        self.host: list[torch.Tensor] = []  # packed bytes per offloaded layer (pinned on CUDA)
        self.owner = [-1] * self.num_slots  # offloaded layer whose bytes a slot holds / awaits
        self.copies = 0  # layer copies issued (tests, benchmarks)
        if self.is_cuda:
            self.stream = torch.cuda.Stream(device)
            self.loaded = [torch.cuda.Event() for _ in range(self.num_slots)]
            self.free = [torch.cuda.Event() for _ in range(self.num_slots)]

    @property
    def offloaded_bytes(self) -> int:
        return sum(h.numel() for h in self.host)

    @property
    def buffer_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def add(self, layer: nn.Module) -> None:
        """Move ``layer``'s linear tensors to host memory; its parameters become views into
        its working slot."""
        j = len(self.host)
        slot = self.buffers[j % self.num_slots]
        entries = linear_tensors(layer)
        size = sum(align(t.nbytes) for _, _, t in entries)
        assert size <= slot.numel(), f"layer {j}: {size} bytes > working buffer {slot.numel()}"
        host = torch.empty(size, dtype=torch.uint8, pin_memory=self.is_cuda)
        offset = 0
        for module, name, tensor in entries:
            n = tensor.nbytes
            host[offset : offset + n].view(tensor.dtype).view(tensor.shape).copy_(tensor)
            view = slot[offset : offset + n].view(tensor.dtype).view(tensor.shape)
            module._parameters[name] = nn.Parameter(view, requires_grad=False)
            offset += align(n)
        self.host.append(host)
        layer.register_forward_pre_hook(functools.partial(self._before_layer, j))
        layer.register_forward_hook(functools.partial(self._after_layer, j))

    def attach(self, model: nn.Module) -> None:
        """Start the first offloaded layer's copy as soon as a forward begins."""
        model.register_forward_pre_hook(lambda module, args: self._load(0))

    # ---- hooks -----------------------------------------------------------------------------
    def _load(self, j: int) -> None:
        """Issue the copy of offloaded layer ``j`` into its slot unless it is already there."""
        s = j % self.num_slots
        if self.owner[s] == j:
            return
        host = self.host[j]
        dst = self.buffers[s][: host.numel()]
        if self.is_cuda:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(self.free[s])  # the slot's last reader is done
                dst.copy_(host, non_blocking=True)
                self.loaded[s].record(self.stream)
        else:
            dst.copy_(host)
        self.owner[s] = j
        self.copies += 1

    def _before_layer(self, j: int, module: nn.Module, args: tuple) -> None:
        self._load(j)
        if self.is_cuda:
            torch.cuda.current_stream(self.device).wait_event(self.loaded[j % self.num_slots])
        nxt = (j + 1) % len(self.host)
        if nxt % self.num_slots != j % self.num_slots:  # prefetch into the other slot
            self._load(nxt)

    def _after_layer(self, j: int, module: nn.Module, args: tuple, output: object) -> None:
        if self.is_cuda:
            self.free[j % self.num_slots].record(torch.cuda.current_stream(self.device))


def place_weights(
    model: nn.Module, device: torch.device, method: QuantMethod | None, plan: WeightPlan
) -> WeightOffloader | None:
    """Quantize and place a model loaded on the CPU, one decoder layer at a time (so device
    memory never holds more than the resident weights plus one layer in flight)."""
    offloader = None
    if plan.offload_layers:
        slot_bytes = max(plan.layer_bytes[i] for i in plan.offload_layers)
        offloader = WeightOffloader(device, slot_bytes, len(plan.offload_layers))
    offload = set(plan.offload_layers)
    layers = decoder_layers(model) if (offload or method is not None) else []
    quantize = method is not None and not method.prequantized
    for i, layer in enumerate(layers):
        if quantize:
            quantize_module(layer, method, device)
        if i in offload:
            offloader.add(layer)
        else:
            layer.to(device)
    if quantize:
        quantize_module(model, method, device)  # linear layers outside the decoder stack
    model.to(device)
    if offloader is not None:
        offloader.attach(model)
        logger.info(
            "offloaded %d of %d decoder layers (%.2f GiB%s) to %s memory; %d working buffers "
            "of %.2f GiB on %s",
            len(plan.offload_layers),
            len(layers),
            offloader.offloaded_bytes / GiB,
            f", {method.name}" if method is not None else "",
            "pinned host" if offloader.is_cuda else "host",
            offloader.num_slots,
            offloader.buffer_bytes / offloader.num_slots / GiB,
            device,
        )
        if device.type == "cpu":
            logger.warning(
                "cpu_offload_gb on the CPU saves no memory (the weights live in host memory "
                "already) and turns off the packed CPU matmuls: leave it at 0 here"
            )
        elif offloader.num_slots == len(plan.offload_layers):
            logger.warning(
                "cpu_offload_gb covers only %d layer(s), which fit in the working buffers: "
                "nothing streams and no device memory is saved",
                len(plan.offload_layers),
            )
        if offloader.is_cuda:
            logger.info("CUDA graphs off: offloaded layers stream their weights from forward hooks")
    return offloader


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """stats(): device-resident weight bytes (working buffers included) and offloaded bytes."""
    offloader: WeightOffloader | None = getattr(model, "weight_offloader", None)
    buffers = {b.untyped_storage().data_ptr() for b in offloader.buffers} if offloader else set()
    resident = sum(
        p.nbytes for p in model.parameters() if p.untyped_storage().data_ptr() not in buffers
    )
    # a CPU model's packed copies (layers/cpu_gemm.py) replace their dense weights, but that
    # of an LM head tied to the embedding comes on top of the weight the lookup reads
    resident += sum(
        m.cpu_packed.numel() * m.cpu_packed.element_size()
        for m in model.modules()
        if getattr(m, "cpu_packed", None) is not None and not m.weight.is_meta
    )
    return {
        "weight_bytes_resident": resident + (offloader.buffer_bytes if offloader else 0),
        "weight_bytes_offloaded": offloader.offloaded_bytes if offloader else 0,
    }
