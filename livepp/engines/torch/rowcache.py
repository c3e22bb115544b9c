"""Many sequences in one KV cache, each fed any number of tokens per forward pass.

A :class:`RowCache` holds the keys and values of every row of a batch on one
shared timeline of columns, and beside it, per row and column, whether the
column holds one of the row's tokens and that token's position. A forward
pass feeds each row its own tokens (a generated token; a token and the text
an intervention injects; a watched text's next tokens; a prompt), so a block
is as wide as the row that feeds the most, and the other rows' unused slots
become columns that are not theirs. That is what lets one forward pass mix
rows that feed different numbers of tokens, and rows join (their caches are
stacked), leave (selected out; columns no row uses are dropped) or start over
(``forget``) at any step.

Attention follows positions, not columns: the masks are built here from the
positions, per layer kind: a token sees the row's tokens at positions up to
its own, and on a sliding-window layer (Gemma 2/3, Mistral) only those less
than the window behind it. Every layer keeps its whole history (a sliding
layer's old columns are masked, not dropped), so the numbers equal the row's
own decoding whatever else shares the batch; a sliding-window model's batch
holds as much KV memory as a full-attention one's.

While every row holds a token in every column at the position of that
column (one row decoding alone, or rows that prefilled the same length and
fed alike since), no mask is passed: the model builds its own causal (and
sliding-window) mask, as a single stream's forward pass does, so one request
alone gets bit for bit the numbers of the single-stream decoder.

Only the logits a caller asks for are computed: the final norm's output at
those (row, slot) pairs goes through the output layer (and the model's final
logit soft-capping or scaling), never a ``[rows, slots, vocabulary]`` block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from livepp.core.params import LiveppError
from livepp.engines.torch.packed import PackedLinear

__all__ = ["RowCache", "LayerKinds", "layer_kinds", "final_logits"]

FEW_ROWS = 64
"""Up to this many rows, the output layer is ``W @ hidden.T`` (faster than
``linear`` here from 2 to 64 rows, slower at 256)."""


@dataclass(frozen=True)
class LayerKinds:
    """The attention kinds of a model's layers: ``types`` per layer
    ("full_attention", "sliding_attention"), the sliding window, and whether
    the model takes one mask per kind (a dict) or one mask for all layers."""

    types: tuple[str, ...]
    window: int | None
    per_kind: bool
    additive: bool  # eager attention adds a float mask; SDPA takes a boolean one


def layer_kinds(model: Any) -> LayerKinds:
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = model.config.get_text_config(decoder=True)
    types, kwargs = get_layer_types_and_kwargs(config)
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise LiveppError(f"batching needs full or sliding-window attention layers; this model has {sorted(unknown)}")
    windows = {kw.get("sliding_window") for t, kw in zip(types, kwargs) if t == "sliding_attention"}
    window = windows.pop() if windows else None
    if windows:
        raise LiveppError("batching needs one sliding window for all sliding layers")
    # Models with mixed layers read a {kind: mask} mapping (they build one mask per kind themselves).
    per_kind = getattr(config, "layer_types", None) is not None and len(set(types)) > 1
    if len(set(types)) > 1 and not per_kind:
        raise LiveppError("batching cannot give this model's mixed attention layers their masks")
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    return LayerKinds(tuple(types), window, per_kind, additive=impl == "eager")


def final_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from final hidden states ``[N, H]``: the output layer
    and what a causal LM's head does after it (Gemma's soft-capping, Cohere's
    ``logit_scale``, Granite's ``logits_scaling``).

    The output layer's [V, H] matrix is the largest of a small model, and on
    the CPU ``linear`` multiplies it by a few rows with slow kernels: for 2 to
    :data:`FEW_ROWS` rows on the CPU (a plain ``nn.Linear``, not a quantized
    or wrapped one) the logits are taken as ``W @ hidden.T`` instead,
    the same products summed in another order (4 rows of Gemma 3's 262k
    vocabulary: 79 ms by ``linear``, 17 ms so; SmolLM2's 49k: 12.6 and
    2.8 ms). More rows go through ``linear``, padded to a multiple of 4 (its
    kernels for 2, 3, 6 or 7 rows ran 1.4-2x slower than for 4 or 8). One
    row is left to ``linear`` as the model computes it (a stream alone keeps
    the single-stream decoder's numbers). A head packed for oneDNN
    (:mod:`~livepp.engines.torch.packed`, the CPU default) is faster than
    either for any number of rows and is called as it is."""
    n = hidden.shape[0]
    head = model.get_output_embeddings()
    if type(head) is PackedLinear:  # oneDNN's packed weight: fast for any number of rows (packed.py)
        logits = head(hidden)
    elif 1 < n <= FEW_ROWS and type(head) is torch.nn.Linear and hidden.device.type == "cpu":
        logits = torch.mm(head.weight, hidden.t()).t().contiguous()
        if head.bias is not None:
            logits += head.bias
    else:
        pad = -n % 4 if n > 1 else 0
        if pad:
            hidden = torch.cat([hidden, hidden.new_zeros((pad, hidden.shape[1]))])
        logits = head(hidden)
        if pad:
            logits = logits[:n]
    config = model.config.get_text_config(decoder=True)
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, (int, float)):
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        logits = logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class RowCache:
    """Rows of one KV cache (see the module docstring). ``valid[b, c]``:
    column c holds a token of row b; ``positions[b, c]``: its position."""

    def __init__(self, model: Any, kinds: LayerKinds, pad_id: int = 0) -> None:
        self.model, self.kinds, self.pad_id = model, kinds, pad_id
        self.device = model.device
        self.cache: Any = None
        self.valid = torch.zeros((0, 0), dtype=torch.bool, device=self.device)
        self.positions = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.aligned = True  # every column holds a token of every row, at the column's position (module docstring)

    @property
    def rows(self) -> int:
        return int(self.valid.shape[0])

    @property
    def width(self) -> int:
        return int(self.valid.shape[1])

    # ---- one forward pass ------------------------------------------------------
    def forward(self, feeds: Sequence[Sequence[int]], starts: Sequence[int], wanted: Sequence[Sequence[int]], *,
                logits: bool = True) -> torch.Tensor:
        """Feed row b the tokens ``feeds[b]`` at positions ``starts[b]``,
        ``starts[b] + 1``, ...; the logits at each row's ``wanted`` slots (indices
        into its feed), rows in order: ``[sum of len(wanted[b]), V]`` (their
        final hidden states instead, ``[..., H]``, without ``logits``). A row
        may feed nothing this pass. A fresh cache is made by the first pass."""
        from transformers import DynamicCache

        n_rows = len(feeds)
        if self.cache is None:
            self.cache = DynamicCache()  # every layer full: sliding windows are masked (module docstring)
            self.valid = torch.zeros((n_rows, 0), dtype=torch.bool, device=self.device)
            self.positions = torch.zeros((n_rows, 0), dtype=torch.long, device=self.device)
        elif self.width == 0:  # rows that joined empty
            self.cache = DynamicCache()
        assert n_rows == self.rows, (n_rows, self.rows)
        q = max(1, max(len(f) for f in feeds))
        device = self.device
        # Each row's tokens first in the block, then unused slots (padding).
        ids = torch.tensor([list(f) + [self.pad_id] * (q - len(f)) for f in feeds], device=device)
        lengths = torch.tensor([len(f) for f in feeds], device=device)
        slot = torch.arange(q, device=device)
        new_valid = slot[None, :] < lengths[:, None]  # [B, q]
        new_positions = torch.tensor(starts, device=device)[:, None] + slot[None, :]  # [B, q]
        valid = torch.cat([self.valid, new_valid], dim=1)  # [B, T+q]
        positions = torch.cat([self.positions, new_positions], dim=1)
        width = self.width
        self.aligned = self.aligned and all(len(f) == q for f in feeds) and all(s == width for s in starts)
        masks = None if self.aligned else self._masks(valid, positions, new_valid, new_positions)
        out = self.model.base_model(input_ids=ids, attention_mask=masks, position_ids=new_positions, past_key_values=self.cache,
                                    use_cache=True, cache_position=torch.arange(width, width + q, device=device))
        self.valid, self.positions = valid, positions
        pairs = [(b, s) for b, slots in enumerate(wanted) for s in slots]
        if not pairs:
            return torch.empty((0, 0), device=device)
        hidden = out.last_hidden_state[torch.tensor([b for b, _ in pairs], device=device), torch.tensor([s for _, s in pairs], device=device)]
        return final_logits(self.model, hidden) if logits else hidden

    def _masks(self, valid: torch.Tensor, positions: torch.Tensor, new_valid: torch.Tensor, new_positions: torch.Tensor) -> Any:
        # allowed[b, i, j]: slot i of row b sees column j: one of the row's
        # tokens, at a position up to the slot's own.
        width = valid.shape[1]
        q = new_valid.shape[1]
        seen = valid[:, None, :] & (positions[:, None, :] <= new_positions[:, :, None])  # [B, q, T+q]
        # An unused slot sees only itself, so nothing it computes is NaN.
        own = torch.zeros((q, width), dtype=torch.bool, device=valid.device)
        own[torch.arange(q), width - q + torch.arange(q)] = True
        unused = ~new_valid[:, :, None] & own[None]
        full = seen | unused
        masks: dict[str, torch.Tensor] = {}
        for kind in set(self.kinds.types):
            allowed = full
            if kind == "sliding_attention" and self.kinds.window is not None:
                near = (new_positions[:, :, None] - positions[:, None, :]) < self.kinds.window
                allowed = (seen & near) | unused
            masks[kind] = self._form(allowed[:, None])
        if self.kinds.per_kind:
            return masks
        return masks[self.kinds.types[0]]

    def _form(self, allowed: torch.Tensor) -> torch.Tensor:
        if not self.kinds.additive:
            return allowed
        dtype = self.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    # ---- rows joining, leaving, starting over ------------------------------------
    def select(self, index: Sequence[int]) -> None:
        """Keep the rows at ``index`` (repeats allowed: N samples share one
        prefill), in that order; drop columns no row uses any more."""
        if not index:
            self.clear()
            return
        at = torch.tensor(list(index), device=self.device)
        if self.cache is not None:
            self.cache.batch_select_indices(at)
        self.valid, self.positions = self.valid[at], self.positions[at]
        self._compact()

    def forget(self, row: int) -> None:
        """Row ``row`` starts over: none of its columns is seen again."""
        self.valid[row] = False
        self.aligned = False

    def _compact(self) -> None:
        used = self.valid.any(dim=0)
        if bool(used.all()):
            return
        keep = used.nonzero()[:, 0]
        first, last = int(keep[0]) if len(keep) else self.width, int(keep[-1]) + 1 if len(keep) else self.width
        if len(keep) == last - first:  # one run of used columns: a slice, no copy
            cut = slice(first, last)
            self.valid, self.positions = self.valid[:, cut], self.positions[:, cut]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut], layer.values[:, :, cut]
            return
        self.valid, self.positions = self.valid[:, keep], self.positions[:, keep]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]

    def stack(self, other: "RowCache") -> None:
        """``other``'s rows join after this cache's, both on one timeline
        (the narrower one's columns padded at the front)."""
        if other.cache is None or other.rows == 0:
            return
        if self.cache is None or self.width == 0:
            empty = self.rows  # rows that joined with no tokens yet stay first
            self.cache, self.valid, self.positions = other.cache, other.valid, other.positions
            self.aligned = other.aligned and not empty
            if empty:
                for layer in self.cache.layers:
                    layer.keys = torch.cat([layer.keys.new_zeros((empty, *layer.keys.shape[1:])), layer.keys], dim=0)
                    layer.values = torch.cat([layer.values.new_zeros((empty, *layer.values.shape[1:])), layer.values], dim=0)
                self.valid = torch.cat([self.valid.new_zeros((empty, self.width)), self.valid], dim=0)
                self.positions = torch.cat([self.positions.new_zeros((empty, self.width)), self.positions], dim=0)
            return
        width = max(self.width, other.width)

        def pad(x: torch.Tensor, length: int) -> torch.Tensor:
            return F.pad(x, (0, 0, width - length, 0)) if width > length else x

        la, lb = self.width, other.width
        self.aligned = self.aligned and other.aligned and la == lb
        for a, b in zip(self.cache.layers, other.cache.layers):
            a.keys = torch.cat([pad(a.keys, la), pad(b.keys, lb)], dim=0)
            a.values = torch.cat([pad(a.values, la), pad(b.values, lb)], dim=0)
        self.valid = torch.cat([F.pad(self.valid, (width - la, 0)), F.pad(other.valid, (width - lb, 0))], dim=0)
        self.positions = torch.cat([F.pad(self.positions, (width - la, 0)), F.pad(other.positions, (width - lb, 0))], dim=0)

    def add_empty_row(self) -> None:
        """A row with no tokens yet joins after the others."""
        self.aligned = self.aligned and self.width == 0
        if self.cache is not None:
            for layer in self.cache.layers:
                if layer.is_initialized:
                    layer.keys = torch.cat([layer.keys, layer.keys.new_zeros((1, *layer.keys.shape[1:]))], dim=0)
                    layer.values = torch.cat([layer.values, layer.values.new_zeros((1, *layer.values.shape[1:]))], dim=0)
        self.valid = torch.cat([self.valid, self.valid.new_zeros((1, self.width))], dim=0)
        self.positions = torch.cat([self.positions, self.positions.new_zeros((1, self.width))], dim=0)

    def clear(self) -> None:
        self.cache, self.aligned = None, True
        self.valid = torch.zeros((0, 0), dtype=torch.bool, device=self.device)
        self.positions = torch.zeros((0, 0), dtype=torch.long, device=self.device)
