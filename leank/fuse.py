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
code is untouched: ``self.k_proj(h)`` still works). The originals keep views into the fused
parameter, so fusing allocates nothing lasting and :func:`unfuse_projections` restores them for
free (do that before saving a checkpoint: the fused model's ``state_dict`` names differ).

A part called with another input than its siblings' (a model that projects q and k/v from
different tensors) computes the whole product for itself: slower, still correct.
"""

from __future__ import annotations

import torch
from torch import nn

# Sibling projections that read the same input in the decoder families LeanK supports.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
FUSED_NAMES = {("q_proj", "k_proj", "v_proj"): "leank_qkv_proj", ("gate_proj", "up_proj"): "leank_gate_up_proj"}


class SharedProjection(nn.Module):
    """One GEMM for several sibling projections; ``parts`` read their slices of its product."""

    def __init__(self, linears: list[nn.Linear], names: tuple[str, ...]):
        super().__init__()
        first = linears[0]
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
        has_bias = first.bias is not None
        self.bias = (nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
                     if has_bias else None)
        sizes = [m.out_features for m in linears]
        self.bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
        self.names = names
        # Not submodules: the model's tree holds the parts, and the originals only come back on unfuse.
        object.__setattr__(self, "originals", list(linears))
        self._input = self._output = None
        self._reads = 0

    def read(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._input is not x:
            self._input, self._output, self._reads = x, nn.functional.linear(x, self.weight, self.bias), 0
        lo, hi = self.bounds[index]
        out = self._output[..., lo:hi]
        self._reads += 1
        if self._reads == len(self.bounds):  # every part has read: keep nothing alive past this forward
            self._input = self._output = None
            self._reads = 0
        return out

    def restore_originals(self) -> list[nn.Linear]:
        """The original modules, their weights re-pointed at slices of the (possibly moved) fused ones."""
        for m, (lo, hi) in zip(self.originals, self.bounds, strict=True):
            m.weight = nn.Parameter(self.weight.detach()[lo:hi], requires_grad=False)
            if self.bias is not None:
                m.bias = nn.Parameter(self.bias.detach()[lo:hi], requires_grad=False)
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
        for names in GROUPS:
            linears = [getattr(module, n, None) for n in names]
            if any(m is None for m in linears) or not _fusable(linears):
                continue
            shared = SharedProjection(linears, names)
            setattr(module, FUSED_NAMES[names], shared)
            for i, (name, m) in enumerate(zip(names, linears, strict=True)):
                setattr(module, name, ProjectionPart(shared, i))
                lo, hi = shared.bounds[i]  # the original now views the fused weight: its own storage is freed
                m.weight = nn.Parameter(shared.weight.detach()[lo:hi], requires_grad=False)
                if m.bias is not None:
                    m.bias = nn.Parameter(shared.bias.detach()[lo:hi], requires_grad=False)
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
            delattr(module, fused_name)
            restored += 1
    return restored


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, SharedProjection) for m in model.modules())
