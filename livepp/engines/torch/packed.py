"""Linear layers whose weights are packed once for oneDNN (CPU, float32).

``F.linear`` on the CPU hands each call's [out, in] weight to a GEMM that
repacks it every time; the weights of a small model do not stay in cache, so
for the few rows a decode step or a short prompt feeds, that repacking and
streaming is most of the forward pass. oneDNN's linear on a weight reordered
once into its own blocked layout (what inductor's CPU freezing does) skips
it. Measured on this project's 2-core AMD machine, SmolLM2-135M in float32:
a forward pass of 1 token 39 -> 18.5 ms, 30 tokens 98 -> 39 ms, 512 tokens
920 -> 495 ms; the output layer of Gemma 3's 262k vocabulary for one row
42 -> 10.7 ms. The products are summed in another order: logprobs differ
from ``F.linear``'s by the rounding of float32 (up to 9e-5 in absolute, as
far from a float64 run as ``F.linear``'s 6e-5).

:func:`pack_linears` turns a model's plain ``nn.Linear`` modules into
:class:`PackedLinear` in place; ``weight`` stays the dense parameter it was
(tied weights, ``state_dict`` and ``.to()`` are as before). The packed copy
costs the weights' memory once more. A module computes with it only on the
CPU, in float32, with autograd off for it (``inference_mode``, ``no_grad``,
or weights that need no grad); anything else takes ``F.linear`` on the dense
weight, so training or a model moved to a GPU keep working. A weight changed
after packing is not seen: :func:`unpack_linears`, change, pack again.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["PackedLinear", "can_pack", "pack_linears", "unpack_linears"]


def can_pack() -> bool:
    """Whether this torch has oneDNN's packed linear."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(torch.nn.Linear):
    """An ``nn.Linear`` that also holds its weight packed for oneDNN."""

    packed: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (self.packed is not None and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
                and w.device.type == "cpu" and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, w, self.bias)

    def __deepcopy__(self, memo: dict[int, Any]) -> torch.nn.Linear:
        # The packed copy is an opaque oneDNN tensor; a copy packs its own.
        copy = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                               device=self.weight.device, dtype=self.weight.dtype)
        memo[id(self)] = copy
        copy.weight = _copied(self.weight, memo)
        copy.bias = _copied(self.bias, memo) if self.bias is not None else None
        copy.training = self.training
        _pack(copy)
        return copy


def _copied(p: torch.nn.Parameter, memo: dict[int, Any]) -> torch.nn.Parameter:
    import copy

    return copy.deepcopy(p, memo)


def _pack(module: torch.nn.Linear) -> None:
    module.__class__ = PackedLinear
    with torch.no_grad():
        module.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)  # type: ignore[assignment]


def pack_linears(model: torch.nn.Module) -> int:
    """Pack every plain ``nn.Linear`` of a CPU float32 ``model`` in place;
    how many were packed (0 when this torch cannot, or nothing qualifies)."""
    if not can_pack():
        return 0
    n = 0
    for module in model.modules():
        if (type(module) is torch.nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32
                and module.weight.dim() == 2):
            _pack(module)
            n += 1
    return n


def unpack_linears(model: torch.nn.Module) -> int:
    """Turn a model's :class:`PackedLinear` modules back into plain
    ``nn.Linear`` (their dense weights as they are); how many."""
    n = 0
    for module in model.modules():
        if type(module) is PackedLinear:
            del module.packed
            module.__class__ = torch.nn.Linear
            n += 1
    return n
