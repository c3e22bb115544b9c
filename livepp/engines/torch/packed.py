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
costs the weights' memory once more (``LIVEPP_PACK=0`` in the environment,
or ``load_model(..., pack=False)``, keeps the plain model). A module
computes with it only on the CPU, in float32, with autograd off for it
(``inference_mode``, ``no_grad``, or weights that need no grad) and outside
``torch.compile``/``torch.jit`` tracing (inductor packs weights itself);
anything else takes ``F.linear`` on the dense weight, so training, a model
moved to a GPU or compiled keep working. The packed copy follows the dense
weight: a new parameter (``tie_weights``, ``resize_token_embeddings``), new
storage (``.half().float()``) or an in-place change (``load_state_dict``,
``zero_()``) is packed again at the next call. A copy or a pickle carries
the dense weight only and packs again when first called.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["PackedLinear", "can_pack", "pack_linears", "unpack_linears"]


@functools.cache
def can_pack() -> bool:
    """Whether this torch has oneDNN's packed linear, and it gives what
    ``F.linear`` gives on a small layer (checked once per process)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        with torch.inference_mode():
            gen = torch.Generator().manual_seed(0)
            w, x = torch.randn(24, 40, generator=gen), torch.randn(3, 40, generator=gen)
            got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, None), None, "none", [], "")
            return bool(torch.allclose(got, F.linear(x, w), rtol=1e-4, atol=1e-4))
    except RuntimeError:  # an ISA or build oneDNN cannot run here
        return False


class PackedLinear(torch.nn.Linear):
    """An ``nn.Linear`` that also holds its weight packed for oneDNN."""

    packed: torch.Tensor | None = None
    _packed_of: tuple[Any, ...] | None = None  # what the packed copy was made from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (_packable(w) and x.device.type == "cpu" and x.dtype == torch.float32
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
            key = _weight_key(w)
            if self.packed is None or key != self._packed_of:
                _pack_weight(self, key)
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, w, self.bias)

    def __getstate__(self) -> dict[str, Any]:
        # The packed copy is an opaque oneDNN tensor (no storage to copy or
        # pickle): a copy carries the dense weight and packs at its first call.
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in ("packed", "_packed_of")}


def _packable(w: torch.Tensor) -> bool:
    """Whether a linear layer's weight is one oneDNN's packed linear takes: CPU, float32, [out, in]."""
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2


def _weight_key(w: torch.Tensor) -> tuple[Any, ...]:
    """The dense weight's identity: the parameter, its storage, shape and in-place version."""
    try:
        version = w._version
    except RuntimeError:  # an inference tensor keeps no version counter
        version = None
    return (id(w), w.data_ptr(), tuple(w.shape), version)


def _pack_weight(module: torch.nn.Linear, key: tuple[Any, ...] | None = None) -> None:
    with torch.no_grad():
        module.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)  # type: ignore[assignment]
    module._packed_of = key if key is not None else _weight_key(module.weight)  # type: ignore[attr-defined]


def _pack(module: torch.nn.Linear) -> None:
    module.__class__ = PackedLinear
    _pack_weight(module)


def pack_linears(model: torch.nn.Module) -> int:
    """Pack every plain ``nn.Linear`` of a CPU float32 ``model`` in place;
    how many were packed (0 when this torch cannot, or nothing qualifies)."""
    if not can_pack():
        return 0
    n = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and _packable(module.weight):
            _pack(module)
            n += 1
    return n


def unpack_linears(model: torch.nn.Module) -> int:
    """Turn a model's :class:`PackedLinear` modules back into plain
    ``nn.Linear`` (their dense weights as they are); how many."""
    n = 0
    for module in model.modules():
        if type(module) is PackedLinear:
            module.__dict__.pop("packed", None)
            module.__dict__.pop("_packed_of", None)
            module.__class__ = torch.nn.Linear
            n += 1
    return n
