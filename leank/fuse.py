"""Projections that share an input, run as one GEMM: a decode-speed option for the model itself.

A decode step reads every weight once. transformers runs each layer's q, k and v projections as
three GEMMs and gate and up as two; at decode batch sizes these are matrix-vector products, and
the small ones (k and v of a grouped-query model) run far below copy bandwidth — on an H200 at
Llama-3.1-8B shape the seven projections of a layer reach ~70% of copy bandwidth, four fused ones
~77–81% (``benchmarks/results/fused_projections_h200``). LeanK's own decode step is then bound by
these reads.

:func:`fuse_projections` concatenates each group's weights (and biases) into one parameter; the
original ``nn.Linear`` modules are replaced by light parts that take their slice of one shared
product, computed when the first part is called and dropped when the last has read it (the model's
code is untouched: ``self.k_proj(h)`` still works). The original parameters give their data up
to the fused one (fusing allocates nothing lasting) and get it back, as the fused weights are
then, from :func:`unfuse_projections` — do that before saving a checkpoint: the fused model's
``state_dict`` names differ. Inference only: the fused weights do not take gradients.

A part called with another input than its siblings' (a model that projects q and k/v from
different tensors) computes the whole product for itself: slower, still correct.
"""

from __future__ import annotations

import torch
from torch import nn

# Sibling projections that read the same input in the decoder families LeanK supports, and the name
# their fused module takes on the parent.
FUSED_NAMES = {("q_proj", "k_proj", "v_proj"): "leank_qkv_proj", ("gate_proj", "up_proj"): "leank_gate_up_proj"}


class SharedProjection(nn.Module):
    """One GEMM for several sibling projections; ``parts`` read their slices of its product.

    The memo is one ``(input, product, reads)`` tuple, read and replaced whole: a part always
    slices the product of its own input (also with threads sharing the model)."""

    def __init__(self, linears: list[nn.Linear], names: tuple[str, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
        self.bias = (nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
                     if linears[0].bias is not None else None)
        sizes = [m.out_features for m in linears]
        self.bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
        self.names = names
        # Not submodules: the model's tree holds the parts, and the originals only come back on unfuse.
        # Their parameters (the same objects, for optimisers holding them) hold no data meanwhile.
        object.__setattr__(self, "originals", list(linears))
        for m in linears:
            for p in (m.weight, m.bias):
                if p is not None:
                    p.data = p.data.new_empty(0)
        self._memo = None

    def read(self, x: torch.Tensor, index: int) -> torch.Tensor:
        memo = self._memo
        if memo is None or memo[0] is not x:
            memo = (x, nn.functional.linear(x, self.weight, self.bias), 0)
        reads = memo[2] + 1
        # every part has read: keep nothing alive past this forward
        self._memo = None if reads == len(self.bounds) else (x, memo[1], reads)
        lo, hi = self.bounds[index]
        return memo[1][..., lo:hi]

    def clear(self, *args) -> None:
        """Drop the memo (a forward hook of the parent module: also when the forward raised)."""
        self._memo = None

    def restore_originals(self) -> list[nn.Linear]:
        """The original modules, their parameters (the same objects) given their slices of the fused
        ones as these are now (moved or cast since fusing): views, nothing copied."""
        for m, (lo, hi) in zip(self.originals, self.bounds, strict=True):
            m.weight.data = self.weight.detach()[lo:hi]
            if self.bias is not None:
                m.bias.data = self.bias.detach()[lo:hi]
        return self.originals


class ProjectionPart(nn.Module):
    """Stands in for one fused ``nn.Linear``: its slice of the shared product."""

    def __init__(self, shared: SharedProjection, index: int):
        super().__init__()
        object.__setattr__(self, "shared", shared)  # registered once, on the parent module
        self.index = index
        lo, hi = shared.bounds[index]
        self.in_features, self.out_features = shared.weight.shape[1], hi - lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.read(x, self.index)

    def extra_repr(self) -> str:
        return f"{self.shared.names[self.index]}: slice {self.shared.bounds[self.index]} of the fused projection"


def _fusable(linears) -> bool:
    """Plain ``nn.Linear`` modules with plain (not sharded, not quantised) weights on one device and
    dtype, all with a bias or all without, the same input size, and no hooks (e.g. accelerate's)."""
    if not all(type(m) is nn.Linear for m in linears):
        return False
    if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in linears):
        return False
    weights = [m.weight for m in linears]
    if any(type(w.data) is not torch.Tensor or w.is_meta for w in weights):
        return False
    first = weights[0]
    return (all(w.shape[1] == first.shape[1] and w.dtype == first.dtype and w.device == first.device for w in weights)
            and len({m.bias is None for m in linears}) == 1)


def fuse_projections(model: nn.Module) -> int:
    """Fuse every q/k/v and gate/up group of ``model`` in place (idempotent); returns the number of
    groups fused by this call. Inference only: the fused weights do not require gradients."""
    fused = 0
    for module in list(model.modules()):
        for names, fused_name in FUSED_NAMES.items():
            linears = [getattr(module, n, None) for n in names]
            if any(m is None for m in linears) or not _fusable(linears):
                continue
            shared = SharedProjection(linears, names)
            setattr(module, fused_name, shared)
            for i, name in enumerate(names):
                setattr(module, name, ProjectionPart(shared, i))
            shared.hook = module.register_forward_hook(shared.clear, always_call=True)
            fused += 1
    return fused


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections`; returns the number of groups restored."""
    restored = 0
    for module in list(model.modules()):
        for names, fused_name in FUSED_NAMES.items():
            shared = getattr(module, fused_name, None)
            if not isinstance(shared, SharedProjection):
                continue
            for name, m in zip(names, shared.restore_originals(), strict=True):
                setattr(module, name, m)
            shared.hook.remove()
            delattr(module, fused_name)
            restored += 1
    return restored


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, SharedProjection) for m in model.modules())
