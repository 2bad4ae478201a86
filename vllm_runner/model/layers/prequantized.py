"""Checkpoints stored in 4 bits (AWQ, GPTQ, compressed-tensors W4A16), loaded into int4's
layout (layers/int4.py) exactly.

Each format's module (``awq.py``, ``gptq.py``, ``compressed_tensors.py``) validates its
``quantization_config`` and turns its tensors into int4's ``weight`` / ``weight_scale`` /
``weight_zero``; this module holds what they share: the empty int4 parameters a layer gets
before the checkpoint loads, the conversion of one layer's unpacked values, the input order
of act-order checkpoints, and the choice of method from the checkpoint's config.

Act order (GPTQ ``desc_act``, compressed-tensors ``actorder: group``): a layer's ``g_idx``
[K] names the group of each input, and the groups are not runs of consecutive inputs. The
loader sorts the inputs by group (``input_perm``, a parameter), so that they are, and the
layer gathers its activations in that order before the matmul (``index_select``: no host
sync, CUDA-graph safe): ``x[..., perm] @ W[:, perm].T == x @ W.T``.
"""

import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from vllm_runner.model.layers.int4 import GROUP_SIZE, Int4WeightOnly, cdiv, pack_int4
from vllm_runner.model.layers.linear import LinearBase
from vllm_runner.model.layers.parallel import check_shape

# quantization_config's quant_method of the formats loaded here (also their EngineArgs name)
PREQUANTIZED = ("awq", "compressed-tensors", "gptq")
ROW_GROUP = -1  # one group per output row (GPTQ group_size -1, compressed-tensors "channel")

Tensors = list[tuple[str, torch.Tensor]]


class PrequantizedInt4(Int4WeightOnly):
    """A checkpoint stored in int4: its layers load their quantized tensors, none is quantized
    here. ``prepare`` gives each of them empty int4 parameters before the checkpoint loads;
    the others keep float weights."""

    prequantized = True

    def __init__(self, group_size: int, reorders_inputs: bool = False) -> None:
        """``group_size``: the checkpoint's (ROW_GROUP: int4 groups of GROUP_SIZE that repeat
        the row's scale and zero point); ``reorders_inputs``: the checkpoint may order a
        layer's inputs by group (act order)."""
        super().__init__(GROUP_SIZE if group_size == ROW_GROUP else group_size)
        self.reorders_inputs = reorders_inputs

    def supports(self, layer: LinearBase) -> bool:
        return False  # quantizes no float layer (the quantized ones were prepared)

    def quantized(self, name: str) -> bool:
        """Whether the checkpoint stores its linear layer ``name`` quantized."""
        raise NotImplementedError

    def checkpoint_tensors(self, weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator:
        """The checkpoint's tensors with the quantized ones converted to int4's."""
        raise NotImplementedError

    def by_layer(
        self,
        weights: Iterator[tuple[str, torch.Tensor]],
        required: set[str],  # a quantized layer's tensors' leaf names, but its g_idx
        g_idx: str,  # the leaf name of its g_idx
        group_size: int,  # the checkpoint's, or ROW_GROUP
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors, each quantized layer's converted by ``_convert`` once all
        are in (its g_idx too, with act order); without act order a stored g_idx must name
        the plain groups, and is dropped."""
        if self.reorders_inputs:
            required = required | {g_idx}
        else:
            weights = drop_plain_g_idx(weights, g_idx, group_size)
        return convert_by_layer(weights, frozenset(required), self._convert)

    def _convert(self, prefix: str, parts: dict[str, torch.Tensor]) -> Tensors:
        """One layer's checkpoint tensors (by leaf name) -> int4's under ``prefix``."""
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> int:
        """Empty int4 parameters (on each layer's device, meta included) for every linear
        layer the checkpoint quantized, each with its layer's loader (which merges q/k/v and
        gate/up along dim 0, int4's output dim); returns how many layers."""
        count = 0
        packed = getattr(model, "packed_modules_mapping", {})
        for name, layer in model.named_modules():
            if not isinstance(layer, LinearBase):
                continue
            prefix, _, leaf = name.rpartition(".")
            parts = [f"{prefix}.{src}" for src, (dst, _) in packed.items() if dst == leaf]
            stored = {part: self.quantized(part) for part in parts or [name]}
            if not any(stored.values()):
                continue
            if not all(stored.values()):  # q/k/v or gate/up: one matmul, one weight dtype
                raise ValueError(
                    f"the checkpoint quantizes {[p for p, q in stored.items() if q]} but not "
                    f"{[p for p, q in stored.items() if not q]}, which this engine merges "
                    f"into one layer ({name}): quantize all or none of them"
                )
            n, k = layer.out_features, layer.in_features
            groups, device = cdiv(k, self.group_size), layer.weight.device
            self._set_int4(
                layer,
                torch.empty(n, cdiv(k, 8), dtype=torch.int32, device=device),
                torch.empty(n, groups, dtype=torch.float32, device=device),
                torch.empty(n, groups, dtype=torch.uint8, device=device),
            )
            for param in (layer.weight, layer.weight_scale, layer.weight_zero):
                param.weight_loader = layer.weight_loader
            layer.permutes_inputs = False
            if self.reorders_inputs:
                perm = torch.empty(k, dtype=torch.int32, device=device)
                layer.input_perm = nn.Parameter(perm, requires_grad=False)
                layer.input_perm.weight_loader = functools.partial(_load_input_perm, layer)
                layer.permutes_inputs = None  # (not loaded yet)
            count += 1
        return count

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.permutes_inputs:  # [..., K] in the weight's (group-sorted) input order
            x = x.index_select(-1, layer.input_perm)
        return super().apply(layer, x, bias)


def _load_input_perm(
    layer: LinearBase, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None
) -> None:
    """The input order of a layer, or of each part merged into it: the parts share the
    layer's input, so they must share its order too."""
    check_shape(loaded, param.shape)
    if layer.permutes_inputs is None:
        param.data.copy_(loaded)
        layer.permutes_inputs = not torch.equal(loaded, torch.arange(len(loaded)).to(loaded))
    elif not torch.equal(param.data, loaded.to(param.dtype)):
        raise ValueError(
            "(from its g_idx) orders the inputs unlike the layers merged with it (q/k/v or "
            "gate/up, one matmul here): this engine loads act-order checkpoints whose merged "
            "layers share one g_idx"
        )


def group_order(g_idx: torch.Tensor, group_size: int, k: int) -> torch.Tensor | None:
    """The input order that makes ``g_idx``'s groups runs of ``group_size`` consecutive
    inputs (the last may be short), as int4's layout stores them; None when they already
    are (``g_idx[k] == k // group_size``). A ``g_idx`` no order can make so is refused."""
    check_shape(g_idx, (k,))
    g_idx = g_idx.long()
    plain = torch.arange(k) // group_size
    if torch.equal(g_idx, plain):
        return None
    groups = cdiv(k, group_size)
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        bad = int(g_idx.min()) if int(g_idx.min()) < 0 else int(g_idx.max())
        raise ValueError(f"g_idx names group {bad}, outside 0..{groups - 1} for {k} inputs")
    counts, want = torch.bincount(g_idx, minlength=groups), torch.bincount(plain)
    if not torch.equal(counts, want):
        g = int((counts != want).nonzero()[0])
        raise ValueError(
            f"g_idx puts {int(counts[g])} inputs in group {g}, not {int(want[g])}: int4's "
            f"layout needs groups of group_size {group_size} inputs (the last may be short)"
        )
    return torch.argsort(g_idx, stable=True).to(torch.int32)


def int4_tensors(
    prefix: str,
    q: torch.Tensor,  # [N, K] integers 0..15
    zero: torch.Tensor,  # [N, groups] integers 0..255
    scale: torch.Tensor,  # [N, groups] float
    group_size: int,  # the checkpoint's, or ROW_GROUP
    g_idx: torch.Tensor | None,  # [K] (a method that reorders inputs)
    method: PrequantizedInt4,
) -> Tensors:
    """One layer's unpacked values -> int4's tensors under ``prefix``, exactly: ``weight``,
    ``weight_scale`` (fp32), ``weight_zero`` (uint8) and, for a method that reorders inputs,
    ``input_perm``. A row's one group becomes ``method.group_size``-wide groups of the same
    scale and zero; act-order inputs are sorted by group (module docstring)."""
    n, k = q.shape
    per_row = group_size == ROW_GROUP
    groups = 1 if per_row else cdiv(k, group_size)
    for what, t in (("zero points", zero), ("scales", scale)):
        if tuple(t.shape) != (n, groups):
            raise ValueError(
                f"has {what} of shape {tuple(t.shape)} for a [{n}, {k}] weight in "
                f"{'one group a row' if per_row else f'groups of {group_size}'}: "
                f"({n}, {groups}) expected"
            )
    if per_row:  # the same scale and zero for each of int4's groups
        repeat = cdiv(k, method.group_size)
        zero, scale, group_size = zero.repeat(1, repeat), scale.repeat(1, repeat), k
    perm = None if g_idx is None else group_order(g_idx, group_size, k)
    if perm is not None:
        q = q[:, perm.long()]
    out = [
        (f"{prefix}.weight", pack_int4(q)),
        (f"{prefix}.weight_scale", scale.float().contiguous()),
        (f"{prefix}.weight_zero", zero.to(torch.uint8).contiguous()),
    ]
    if method.reorders_inputs:
        out.append((f"{prefix}.input_perm", torch.arange(k, dtype=torch.int32) if perm is None
                    else perm))  # fmt: skip
    return out


def convert_by_layer(
    weights: Iterator[tuple[str, torch.Tensor]],
    required: frozenset[str],
    convert: Callable[[str, dict[str, torch.Tensor]], Tensors],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors whose leaf name is in ``required`` gathered by layer and, once a
    layer's are all in, replaced by ``convert(layer name, {leaf: tensor})``; the others
    pass unchanged. (A checkpoint stores a layer's tensors together: one is held at a time.)"""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, leaf = name.rpartition(".")
        if leaf not in required:
            yield name, tensor
            continue
        parts = pending.setdefault(prefix, {})
        parts[leaf] = tensor
        if parts.keys() != required:
            continue
        del pending[prefix]
        try:
            converted = convert(prefix, parts)
        except ValueError as e:
            raise ValueError(f"checkpoint layer {prefix!r} {e}") from None
        yield from converted
    if pending:
        prefix, parts = next(iter(pending.items()))
        raise ValueError(f"checkpoint layer {prefix!r} lacks {sorted(required - parts.keys())}")


def drop_plain_g_idx(
    weights: Iterator[tuple[str, torch.Tensor]], leaf: str, group_size: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors but its ``leaf`` ones (g_idx) under a config without act
    order: each must then name the plain groups, ``k // group_size``, which int4 stores."""
    for name, tensor in weights:
        if name.rpartition(".")[2] != leaf:
            yield name, tensor
            continue
        k = tensor.numel()
        try:
            perm = group_order(tensor.view(-1), k if group_size == ROW_GROUP else group_size, k)
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {name!r} {e}") from None
        if perm is not None:
            raise ValueError(
                f"checkpoint tensor {name!r} orders the inputs by group (act order), but the "
                "config declares no act order (GPTQ desc_act, compressed-tensors actorder)"
            )


def unpack_nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their eight 4-bit values (0..15) along ``dim``: nibble i (bits
    4i..4i+3) of word j is element 8j + i, the order GPTQ and compressed-tensors pack in."""
    if packed.dtype != torch.int32:
        raise ValueError(f"has {packed.dtype} words, not int32")
    shifts = 4 * torch.arange(8, dtype=torch.int32)
    values = (packed.movedim(dim, -1)[..., None] >> shifts) & 0xF
    return values.flatten(-2).movedim(-1, dim)


def describe(quant: object) -> str:
    """What a checkpoint's quantization_config is, for errors."""
    if not isinstance(quant, dict):
        return "no quantization_config"
    return f"quant_method {quant.get('quant_method')!r}"


def prequantized_method(name: str, quant: object) -> PrequantizedInt4:
    """The method loading a checkpoint of format ``name`` (one of PREQUANTIZED) with
    ``quant`` (config.json's quantization_config); errors name the value."""
    # (the formats' modules build on this one: imported here)
    if name == "awq":
        from vllm_runner.model.layers.awq import AwqInt4, awq_config

        return AwqInt4(awq_config(quant))
    if name == "gptq":
        from vllm_runner.model.layers.gptq import GptqInt4, gptq_config

        return GptqInt4(gptq_config(quant))
    from vllm_runner.model.layers.compressed_tensors import CompressedInt4, compressed_config

    return CompressedInt4(compressed_config(quant))


def resolve_quantization(requested: str | None, hf_config: object) -> str | None:
    """The quantization an engine runs: ``requested`` (EngineArgs), or the format of a
    pre-quantized checkpoint (None asks for auto-detection, as vLLM does). A request that
    contradicts the checkpoint, and variants this engine cannot load, fail here, naming the
    value, before anything loads."""
    quant = getattr(hf_config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method in PREQUANTIZED:
        prequantized_method(method, quant)
        if requested not in (None, method):
            does = "loads another format" if requested in PREQUANTIZED else (
                "quantizes a float checkpoint at load")  # fmt: skip
            raise ValueError(
                f"quantization={requested!r} {does}, but this checkpoint is already quantized "
                f"(quantization_config quant_method {method!r}): pass quantization={method!r} "
                "or None"
            )
        return method
    if requested in PREQUANTIZED:
        prequantized_method(requested, quant)  # raises: not such a checkpoint
    return requested
