"""Importance analysis of LeanK channel masks and stage-1 α (``leank analyze``).

Input is either a stage-1 α — float ``[layers, kv_heads, head_dim]`` in [0, 1], tensor
``alpha`` in a ``.safetensors`` file — or a :class:`~leank.masks.ChannelMask` file. An α
is analysed as it is (continuous importance) and, for everything that needs a binary
mask (heads, pairs, comparisons), binarised with the stage-2 rule of DESIGN.md §1 at
``--sparsity`` / ``--align``. A mask's importance is its 0/1 value.

RoPE convention (Hugging Face ``rotate_half``): channel ``c`` and ``c + D/2`` form one
rotation pair with frequency index ``i = c mod D/2`` and angular frequency
``θ^(-2i/D)``, so ``i = 0`` is the highest frequency; the *low-frequency half* is
``i >= D/4``.

    leank analyze mask.safetensors --compare leank/masks/smollm2-135m.magnitude-0.70.safetensors --out runs/an
    leank analyze alpha.safetensors --sparsity 0.7 --align 16 --out runs/an

writes ``heatmap.png``, ``frequency.png``, ``heads.png``, ``compare-<name>.png`` per
``--compare``, ``alpha.png`` for an α, and ``analysis.json`` + ``analysis.md``. In Python::

    from leank.analysis import as_source, summary, plot_frequency
    src = as_source("mask.safetensors")
    print(summary(src)["frequency"]["low_frequency_share"])
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._io import atomic_write, atomic_write_json, atomic_write_text, check_writable_dir
from .errors import LeanKError
from .masks import ChannelMask, binarize

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DEFAULT_SPARSITY = 0.7
DEFAULT_ALIGNMENT = 16
DIGITS = 6


@dataclass(frozen=True)
class Source:
    """One thing to analyse: its importance (α, or the mask as 0/1) and its binary mask."""

    name: str
    importance: torch.Tensor  # float32 [layers, kv_heads, head_dim], values in [0, 1]
    mask: ChannelMask  # the mask itself, or α binarised
    is_alpha: bool
    path: str | None = None

    @property
    def kind(self) -> str:
        return "alpha" if self.is_alpha else "mask"


Analyzable = Source | ChannelMask | torch.Tensor | str | Path


# ---- loading and validation ------------------------------------------------------


def _check_head_dim(head_dim: int, what: str) -> None:
    if head_dim % 2:
        raise LeanKError(f"{what} has odd head_dim {head_dim}: RoPE pairs need an even head_dim; is it a K mask?")


def check_alpha(alpha: torch.Tensor, what: str = "alpha") -> torch.Tensor:
    """Validate a stage-1 α and return it as float32 on the CPU."""
    if not isinstance(alpha, torch.Tensor) or alpha.dim() != 3 or not alpha.is_floating_point():
        raise LeanKError(f"{what} must be a float tensor [layers, kv_heads, head_dim]: pass stage-1 α or a mask")
    alpha = alpha.detach().to("cpu", torch.float32)
    if not torch.isfinite(alpha).all() or alpha.min() < 0 or alpha.max() > 1:
        finite = alpha[torch.isfinite(alpha)]
        lo, hi = (finite.min().item(), finite.max().item()) if finite.numel() else (math.nan, math.nan)
        raise LeanKError(
            f"{what} has values outside [0, 1] (min {lo:.4g}, max {hi:.4g}, non-finite "
            f"{int((~torch.isfinite(alpha)).sum())}): pass the clamped stage-1 α, as training saves it"
        )
    _check_head_dim(alpha.shape[-1], what)
    return alpha


def from_alpha(
    alpha: torch.Tensor, *, name: str = "alpha", sparsity: float = DEFAULT_SPARSITY,
    alignment: int = DEFAULT_ALIGNMENT, path: str | None = None,
) -> Source:
    """A source from α; its mask is α binarised at ``sparsity`` with ``alignment``."""
    alpha = check_alpha(alpha, path or name)
    mask = binarize(alpha, sparsity=sparsity, alignment=alignment, method="binarized-alpha")
    return Source(name, alpha, mask, True, path)


def from_mask(mask: ChannelMask, *, name: str = "mask", path: str | None = None) -> Source:
    _check_head_dim(mask.head_dim, name)
    return Source(name, mask.kept.float(), mask, False, path)


def load_source(
    path: str | Path, *, sparsity: float = DEFAULT_SPARSITY, alignment: int = DEFAULT_ALIGNMENT
) -> Source:
    """Read a ``.safetensors`` file holding ``alpha`` (stage-1 α; used if present) or ``mask``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LeanKError(f"file not found: {path}: pass an alpha.safetensors or a mask .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            alpha = f.get_tensor("alpha") if "alpha" in keys else None
    except Exception as e:  # safetensors raises several types for corrupt files
        raise LeanKError(f"cannot read {path}: not a valid .safetensors file ({e})") from None
    name = path.name.removesuffix(".safetensors")
    if alpha is not None:
        return from_alpha(alpha, name=name, sparsity=sparsity, alignment=alignment, path=str(path))
    if "mask" not in keys:
        raise LeanKError(f"{path} holds neither 'alpha' nor 'mask' (has {sorted(keys)}): pass a stage-1 α or a mask")
    return from_mask(ChannelMask.load(path), name=name, path=str(path))


def as_source(
    x: Analyzable, *, name: str | None = None, sparsity: float = DEFAULT_SPARSITY,
    alignment: int = DEFAULT_ALIGNMENT,
) -> Source:
    """Accept a Source, a ChannelMask, a tensor (float = α, bool/int = mask) or a file path."""
    if isinstance(x, Source):
        return x
    if isinstance(x, ChannelMask):
        return from_mask(x, name=name or x.method)
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return from_alpha(x, name=name or "alpha", sparsity=sparsity, alignment=alignment)
        return from_mask(ChannelMask(x), name=name or "mask")
    if isinstance(x, (str, Path)):
        return load_source(x, sparsity=sparsity, alignment=alignment)
    raise LeanKError(f"cannot analyse a {type(x).__name__}: pass α, a ChannelMask or a .safetensors path")


# ---- RoPE frequency ----------------------------------------------------------------


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[..., 2, D/2]``: ``[..., 0, i]`` is channel i, ``[..., 1, i]`` channel i + D/2."""
    _check_head_dim(x.shape[-1], "the input")
    return x.unflatten(-1, (2, x.shape[-1] // 2))


def frequency_profile(importance: torch.Tensor) -> torch.Tensor:
    """Mean importance per RoPE frequency index i (both channels of the pair, all layers
    and heads): float ``[D/2]``, i = 0 the highest frequency. For a mask: kept fraction."""
    return _pairs(importance.float()).mean(dim=(0, 1, 2))


def layer_frequency_profile(importance: torch.Tensor) -> torch.Tensor:
    """:func:`frequency_profile` per layer: float ``[layers, D/2]``."""
    return _pairs(importance.float()).mean(dim=(1, 2))


def low_frequency_share(importance: torch.Tensor) -> float | None:
    """Fraction of the total importance on frequency indices ``i >= D/4`` (None if all zero).
    With D/2 even, 0.5 means no preference; a mask keeping only low-frequency pairs gives 1.0."""
    by_index = _pairs(importance.float()).sum(dim=(0, 1, 2))
    total = by_index.sum().item()
    return by_index[(by_index.numel() + 1) // 2 :].sum().item() / total if total > 0 else None


def pair_states(kept: torch.Tensor) -> torch.Tensor:
    """Per (layer, head, i): 0 = both channels of pair i pruned, 1 = split, 2 = both kept."""
    return _pairs(kept.bool()).long().sum(-2)


def pair_consistency(kept: torch.Tensor) -> dict[str, Any]:
    """How often RoPE partners c and c + D/2 share their fate, over all heads and over
    *partial* heads (0 < kept < D; fully pruned or kept heads are consistent trivially),
    with the value expected there if each head's kept channels were placed at random."""
    kept = kept.bool()
    states = pair_states(kept)
    d = kept.shape[-1]
    counts = kept.sum(-1)
    partial = (counts > 0) & (counts < d)

    def tally(s: torch.Tensor) -> dict[str, Any]:
        n = s.numel()
        both_kept, split = int((s == 2).sum()), int((s == 1).sum())
        return {
            "pairs": n, "both_kept": both_kept, "both_pruned": n - both_kept - split, "split": split,
            "same_fraction": round((n - split) / n, DIGITS) if n else None,
        }

    k = counts[partial].double()
    chance = (k * (k - 1) + (d - k) * (d - k - 1)) / (d * (d - 1))  # hypergeometric P(same)
    return {
        "all_heads": tally(states),
        "partial_heads": {
            **tally(states[partial]), "heads": int(partial.sum()),
            "same_if_random": round(chance.mean().item(), DIGITS) if k.numel() else None,
        },
    }


# ---- heads and comparisons ---------------------------------------------------------


def pruned_heads_per_layer(kept: torch.Tensor) -> list[int]:
    """Number of fully pruned KV heads (no channel kept) in each layer."""
    return (kept.bool().sum(-1) == 0).sum(-1).tolist()


def _as_kept(x: ChannelMask | torch.Tensor) -> torch.Tensor:
    return x.kept if isinstance(x, ChannelMask) else x.bool()


def compare_masks(a: ChannelMask | torch.Tensor, b: ChannelMask | torch.Tensor) -> dict[str, Any]:
    """Kept-channel overlap of two masks of the same shape.

    ``jaccard_per_layer``: |A∩B| / |A∪B| of kept (head, channel) entries per layer (1.0
    when both keep nothing); ``jaccard_if_random``: the same ratio of expectations if each
    head kept its count of channels at random. ``channels``: the 2×2 confusion counts;
    ``pruned_heads``: agreement on fully pruned heads.
    """
    ka, kb = _as_kept(a), _as_kept(b)
    if ka.shape != kb.shape:
        raise LeanKError(
            f"cannot compare masks of shapes {tuple(ka.shape)} and {tuple(kb.shape)} (layers, kv_heads, head_dim): "
            "compare masks of the same model"
        )
    d = ka.shape[-1]

    def ratio(num: torch.Tensor, den: torch.Tensor) -> list[float]:
        return [round(n / m, DIGITS) if m > 0 else 1.0 for n, m in zip(num.tolist(), den.tolist(), strict=True)]

    inter, union = (ka & kb).sum((1, 2)), (ka | kb).sum((1, 2))
    ca, cb = ka.sum(-1).double(), kb.sum(-1).double()
    e_inter = (ca * cb / d).sum(-1)
    e_union = (ca + cb).sum(-1) - e_inter
    pa, pb = ka.sum(-1) == 0, kb.sum(-1) == 0
    both, neither = int((pa & pb).sum()), int((~pa & ~pb).sum())
    return {
        "jaccard": ratio(inter.sum()[None], union.sum()[None])[0],
        "jaccard_per_layer": ratio(inter, union),
        "jaccard_if_random": ratio(e_inter.sum()[None], e_union.sum()[None])[0],
        "jaccard_if_random_per_layer": ratio(e_inter, e_union),
        "channels": {
            "kept_in_both": int((ka & kb).sum()), "kept_only_in_a": int((ka & ~kb).sum()),
            "kept_only_in_b": int((~ka & kb).sum()), "pruned_in_both": int((~ka & ~kb).sum()),
        },
        "pruned_heads": {
            "in_both": both, "only_in_a": int((pa & ~pb).sum()), "only_in_b": int((~pa & pb).sum()),
            "in_neither": neither, "agreement": round((both + neither) / pa.numel(), DIGITS),
            "per_layer_a": pa.sum(-1).tolist(), "per_layer_b": pb.sum(-1).tolist(),
        },
    }


# ---- summary -----------------------------------------------------------------------


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, DIGITS)


def summary(source: Analyzable, others: Sequence[Analyzable] = ()) -> dict[str, Any]:
    """All numbers of an analysis as a JSON-ready dict (comparisons: ``source`` is a)."""
    src = as_source(source)
    mask = src.mask
    kept = mask.kept
    freq: dict[str, Any] = {
        "importance_by_index": [_r(v) for v in frequency_profile(src.importance).tolist()],
        "low_frequency_share": _r(low_frequency_share(src.importance)),
        "low_frequency_share_per_layer": [_r(low_frequency_share(x[None])) for x in src.importance],
    }
    if src.is_alpha:
        freq["kept_fraction_by_index"] = [_r(v) for v in frequency_profile(kept).tolist()]
        freq["kept_low_frequency_share"] = _r(low_frequency_share(kept))
    out: dict[str, Any] = {
        "input": {"name": src.name, "path": src.path, "kind": src.kind, "shape": list(kept.shape)},
        "mask": {
            "model": mask.model, "method": mask.method, "alignment": mask.alignment,
            "model_layers": list(mask.model_layers),
            "sparsity": _r(mask.sparsity), "fully_pruned_heads": mask.fully_pruned_heads,
            "total_heads": mask.num_layers * mask.num_kv_heads,
            "heads_by_kept_count": {str(k): v for k, v in mask.count_histogram().items()},
            "fully_pruned_heads_per_layer": pruned_heads_per_layer(kept),
            "kept_fraction_per_layer": [_r(v) for v in kept.float().mean((1, 2)).tolist()],
        },
        "frequency": freq,
        "pairs": pair_consistency(kept),
    }
    if src.is_alpha:
        a = src.importance
        out["alpha"] = {
            "mean": _r(a.mean().item()), "below_0.1": _r((a < 0.1).float().mean().item()),
            "from_0.1_to_0.9": _r(((a >= 0.1) & (a <= 0.9)).float().mean().item()),
            "above_0.9": _r((a > 0.9).float().mean().item()),
        }
    comparisons = []
    for other in others:
        o = as_source(other)
        comparisons.append({"a": src.name, "b": o.name, "b_path": o.path, **compare_masks(kept, o.mask.kept)})
    if comparisons:
        out["comparisons"] = comparisons
    return out


# ---- plots -------------------------------------------------------------------------


def _have_matplotlib() -> bool:
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(**kw: Any) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LeanKError("plots need matplotlib: pip install 'leank[plots]'") from None
    fig = Figure(layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _label(src: Source) -> str:
    return f"{src.name} ({'α' if src.is_alpha else 'mask'}, {src.mask.sparsity:.0%} pruned)"


def plot_heatmap(source: Analyzable, path: str | Path) -> Path:
    """Importance per (layer × head) row and channel column, one PNG."""
    src = as_source(source)
    layers, heads, d = src.importance.shape
    fig = _figure(figsize=(8, min(12, 2 + 0.035 * layers * heads)))
    ax = fig.subplots()
    im = ax.imshow(src.importance.reshape(layers * heads, d).numpy(), aspect="auto", interpolation="nearest",
                   cmap="viridis", vmin=0, vmax=1)
    if heads > 1:
        for layer in range(1, layers):
            ax.axhline(layer * heads - 0.5, color="white", lw=0.3)
    ax.axvline(d / 2 - 0.5, color="red", lw=1, ls="--")
    step = max(1, math.ceil(layers / 16))
    ax.set_yticks([layer * heads + (heads - 1) / 2 for layer in range(0, layers, step)],
                  [str(layer) for layer in range(0, layers, step)])
    ax.set_xticks([0, d // 4, d // 2, 3 * d // 4, d - 1])
    ax.set_ylabel(f"layer ({heads} KV heads per layer, top to bottom)")
    ax.set_xlabel(f"channel c (red: c = D/2; c and c + D/2 share RoPE frequency i = c mod {d // 2})")
    ax.set_title(_label(src))
    fig.colorbar(im, ax=ax, label="α" if src.is_alpha else "kept", shrink=0.6)
    return _save(fig, path)


def _draw_profiles(ax: Axes, sources: Sequence[Source]) -> None:
    same_d = len({s.importance.shape[-1] for s in sources}) == 1
    for src in sources:
        half = src.importance.shape[-1] // 2
        x = torch.arange(half).double() / (1 if same_d else half)
        line = ax.plot(x.numpy(), frequency_profile(src.importance).numpy(), marker=".", label=_label(src))[0]
        if src.is_alpha:
            ax.plot(x.numpy(), frequency_profile(src.mask.kept).numpy(), ls="--", color=line.get_color(),
                    label=f"{src.name}: kept fraction after binarisation")
    half = sources[0].importance.shape[-1] // 2
    ax.axvline(half / 2 if same_d else 0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("RoPE frequency index i (0 = highest frequency; dotted: start of the low-frequency half)"
                  if same_d else "relative frequency index 2i/D (0 = highest frequency)")
    ax.set_ylabel("mean importance / kept fraction")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)


def plot_frequency_profiles(sources: Sequence[Analyzable], path: str | Path) -> Path:
    """Mean importance against RoPE frequency index for several sources in one panel
    (x is 2i/D when their head_dims differ)."""
    srcs = [as_source(s) for s in sources]
    fig = _figure(figsize=(8, 4))
    _draw_profiles(fig.subplots(), srcs)
    return _save(fig, path)


def plot_frequency(source: Analyzable, path: str | Path, others: Sequence[Analyzable] = ()) -> Path:
    """Importance against RoPE frequency: profiles (``others`` overlaid), per layer, and
    the state of each RoPE pair over partial heads."""
    src = as_source(source)
    srcs = [src, *(as_source(o) for o in others)]
    fig = _figure(figsize=(8, 11))
    ax1, ax2, ax3 = fig.subplots(3, 1, height_ratios=[1, 1.2, 0.9])
    _draw_profiles(ax1, srcs)
    ax1.set_title(f"{src.name}: importance against RoPE frequency")

    by_layer = layer_frequency_profile(src.importance)
    im = ax2.imshow(by_layer.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax2.set_xlabel("RoPE frequency index i")
    ax2.set_ylabel("layer")
    ax2.set_title("mean importance per layer (heads and both pair channels averaged)")
    fig.colorbar(im, ax=ax2, shrink=0.8)

    kept = src.mask.kept
    counts = kept.sum(-1)
    partial = (counts > 0) & (counts < kept.shape[-1])
    states = pair_states(kept)[partial]  # [partial heads, D/2]
    n = max(1, states.shape[0])
    i = torch.arange(kept.shape[-1] // 2).numpy()
    bottom = torch.zeros(i.shape[0])
    for value, label, color in ((2, "both kept", "tab:green"), (1, "split", "tab:orange"),
                                (0, "both pruned", "lightgrey")):
        frac = (states == value).sum(0).float() / n
        ax3.bar(i, frac.numpy(), bottom=bottom.numpy(), width=1.0, color=color, label=label)
        bottom += frac
    pc = pair_consistency(kept)["partial_heads"]
    same = "n/a" if pc["same_fraction"] is None else f"{pc['same_fraction']:.1%}"
    chance = "n/a" if pc["same_if_random"] is None else f"{pc['same_if_random']:.1%}"
    ax3.set_title(f"RoPE pairs (c, c + D/2) in the {pc['heads']} partial heads: same fate {same} (random: {chance})")
    ax3.set_xlabel("RoPE frequency index i")
    ax3.set_ylabel("fraction of partial heads")
    ax3.set_xlim(-0.5, i.shape[0] - 0.5)
    ax3.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def _label_layers(mask: ChannelMask, *axes) -> None:
    """A hybrid model's mask rows are its compressed layers: label the x axes with their model indices."""
    if mask.layers is not None:
        for ax in axes:
            ax.set_xticks(range(mask.num_layers), [str(i) for i in mask.layers])


def plot_heads(source: Analyzable, path: str | Path) -> Path:
    """Fully pruned heads per layer, kept fraction per layer, histogram of kept counts."""
    src = as_source(source)
    mask = src.mask
    layers = torch.arange(mask.num_layers).numpy()
    fig = _figure(figsize=(12, 3.6))
    ax1, ax2, ax3 = fig.subplots(1, 3, width_ratios=[1.3, 1.3, 1])
    _label_layers(mask, ax1, ax2)
    ax1.bar(layers, pruned_heads_per_layer(mask.kept), color="tab:red")
    ax1.set_ylim(0, mask.num_kv_heads)
    ax1.yaxis.get_major_locator().set_params(integer=True)
    ax1.set_xlabel("layer")
    ax1.set_ylabel(f"fully pruned KV heads (of {mask.num_kv_heads})")
    ax1.set_title(f"{mask.fully_pruned_heads}/{mask.num_layers * mask.num_kv_heads} heads fully pruned")
    ax2.bar(layers, mask.kept.float().mean((1, 2)).numpy(), color="tab:blue")
    ax2.axhline(mask.kept_fraction, color="black", lw=0.8, ls="--")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("kept fraction of K channels")
    ax2.set_title("kept per layer (dashed: overall)")
    hist = mask.count_histogram()
    gaps = [b - a for a, b in zip(list(hist), list(hist)[1:], strict=False)]
    width = 0.8 * min([mask.head_dim / 16, *gaps])
    ax3.bar(list(hist), list(hist.values()), width=width, color="tab:purple")
    ax3.set_xlim(-mask.head_dim / 20, mask.head_dim * 1.05)
    ax3.set_xlabel("kept channels per head")
    ax3.set_ylabel("heads")
    ax3.set_title("kept-count histogram")
    fig.suptitle(_label(src) + (f", binarised with alignment {mask.alignment}" if src.is_alpha else ""))
    return _save(fig, path)


def plot_alpha_histogram(source: Analyzable, path: str | Path) -> Path:
    """Histogram of stage-1 α values (log scale: most mass sits near 0 and 1)."""
    src = as_source(source)
    if not src.is_alpha:
        raise LeanKError(f"{src.name} is a mask, not α: the α histogram needs a stage-1 alpha.safetensors")
    fig = _figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.hist(src.importance.flatten().numpy(), bins=50, range=(0, 1), color="tab:green")
    ax.set_yscale("log")
    ax.set_xlabel("α")
    ax.set_ylabel("channels")
    ax.set_title(f"{src.name}: mean α {src.importance.mean().item():.3f}")
    return _save(fig, path)


def plot_comparison(a: Analyzable, b: Analyzable, path: str | Path) -> Path:
    """Per-layer Jaccard of kept channels, fully pruned heads of each mask, confusion counts."""
    sa, sb = as_source(a), as_source(b)
    c = compare_masks(sa.mask, sb.mask)
    layers = torch.arange(sa.mask.num_layers).numpy()
    fig = _figure(figsize=(12, 3.6))
    ax1, ax2, ax3 = fig.subplots(1, 3, width_ratios=[1.3, 1.3, 0.8])
    _label_layers(sa.mask, ax1, ax2)
    ax1.plot(layers, c["jaccard_per_layer"], marker="o", label=f"measured (all: {c['jaccard']:.2f})")
    ax1.plot(layers, c["jaccard_if_random_per_layer"], ls="--", color="grey",
             label=f"random channels, same counts ({c['jaccard_if_random']:.2f})")
    ax1.set_ylim(0, 1.02)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("Jaccard of kept channels")
    ax1.legend(fontsize=8)
    ph = c["pruned_heads"]
    ax2.bar(layers - 0.2, ph["per_layer_a"], width=0.4, label=f"{sa.name} ({sum(ph['per_layer_a'])})")
    ax2.bar(layers + 0.2, ph["per_layer_b"], width=0.4, label=f"{sb.name} ({sum(ph['per_layer_b'])})")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("fully pruned KV heads")
    ax2.yaxis.get_major_locator().set_params(integer=True)
    ax2.set_title(f"pruned in both: {ph['in_both']}, agreement {ph['agreement']:.0%}")
    ax2.legend(fontsize=8)
    ch = c["channels"]
    grid = [[ch["kept_in_both"], ch["kept_only_in_a"]], [ch["kept_only_in_b"], ch["pruned_in_both"]]]
    ax3.imshow(grid, cmap="Blues")
    for row in range(2):
        for col in range(2):
            ax3.text(col, row, str(grid[row][col]), ha="center", va="center", color="black")
    ax3.set_xticks([0, 1], ["kept in b", "pruned in b"])
    ax3.set_yticks([0, 1], ["kept in a", "pruned in a"])
    ax3.set_title("channels")
    fig.suptitle(f"a = {_label(sa)}   vs   b = {_label(sb)}", fontsize=10)
    return _save(fig, path)


# ---- report and CLI ----------------------------------------------------------------


def render_markdown(s: dict[str, Any], figures: Sequence[str]) -> str:
    """A short human summary of :func:`summary`'s dict, linking ``figures``."""
    inp, m, f, p = s["input"], s["mask"], s["frequency"], s["pairs"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    lines = [
        f"# Importance analysis: {inp['name']}", "",
        f"Input: `{inp['path'] or inp['name']}` ({inp['kind']}, shape {' × '.join(map(str, inp['shape']))}).", "",
        f"- K channels pruned: {pct(m['sparsity'])}"
        + (f" (α binarised, alignment {m['alignment']})" if inp["kind"] == "alpha" else ""),
        f"- fully pruned KV heads: {m['fully_pruned_heads']}/{m['total_heads']}; per layer "
        f"{m['fully_pruned_heads_per_layer']}",
        f"- heads by kept count: {m['heads_by_kept_count']}",
        f"- importance on the low-frequency half (i ≥ D/4): {pct(f['low_frequency_share'])} (0.5 = no preference)",
        f"- RoPE pairs (c, c + D/2) with the same fate in partial heads: {pct(p['partial_heads']['same_fraction'])}"
        f" (random placement: {pct(p['partial_heads']['same_if_random'])}); all heads: "
        f"{pct(p['all_heads']['same_fraction'])}",
    ]
    if "alpha" in s:
        a = s["alpha"]
        lines.append(f"- α: mean {a['mean']:.3f}; < 0.1: {pct(a['below_0.1'])}, 0.1–0.9: "
                     f"{pct(a['from_0.1_to_0.9'])}, > 0.9: {pct(a['above_0.9'])}")
    for c in s.get("comparisons", []):
        ph = c["pruned_heads"]
        lines.append(
            f"- vs `{c['b']}`: Jaccard of kept channels {c['jaccard']:.3f} (random channels, same counts: "
            f"{c['jaccard_if_random']:.3f}); fully pruned heads in both {ph['in_both']}, only here "
            f"{ph['only_in_a']}, only there {ph['only_in_b']}"
        )
    lines += ["", *(f"![{Path(name).stem}]({name})" for name in figures), ""]
    return "\n".join(lines)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "mask"


def analyze(
    path: str | Path, *, compare: Sequence[str | Path] = (), out: str | Path = "analysis",
    sparsity: float = DEFAULT_SPARSITY, alignment: int = DEFAULT_ALIGNMENT, notes: list[str] | None = None,
) -> dict[str, Any]:
    """Write every figure, ``analysis.json`` and ``analysis.md`` to ``out``; return the summary.
    Without matplotlib the figures are skipped and a note says so in ``notes``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LeanKError(f"--out {out} is a file: pass a directory")
    check_writable_dir(out)
    src = load_source(path, sparsity=sparsity, alignment=alignment)
    others = [load_source(p, sparsity=sparsity, alignment=alignment) for p in compare]
    s = summary(src, others)  # validates shapes before anything is written
    if not _have_matplotlib():  # figures are optional; the numbers and the summary are not
        if notes is not None:
            notes.append("figures skipped: matplotlib is not installed (pip install 'leank[plots]')")
        atomic_write_json(out / "analysis.json", s)
        atomic_write_text(out / "analysis.md", render_markdown(s, []))
        return s
    figures = [plot_heatmap(src, out / "heatmap.png"), plot_frequency(src, out / "frequency.png", others),
               plot_heads(src, out / "heads.png")]
    if src.is_alpha:
        figures.append(plot_alpha_histogram(src, out / "alpha.png"))
    used: set[str] = set()
    for k, other in enumerate(others):
        slug = _slug(other.name)
        slug = slug if slug not in used else f"{slug}-{k}"
        used.add(slug)
        figures.append(plot_comparison(src, other, out / f"compare-{slug}.png"))
    atomic_write_json(out / "analysis.json", s)
    atomic_write_text(out / "analysis.md", render_markdown(s, [f.name for f in figures]))
    return s


def main(args: argparse.Namespace) -> int:
    """Handler of ``leank analyze``."""
    notes: list[str] = []
    s = analyze(args.input, compare=args.compare, out=args.out, sparsity=args.sparsity, alignment=args.align,
                notes=notes)
    m, share = s["mask"], s["frequency"]["low_frequency_share"]
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {args.out}/: analysis.json, analysis.md" + ("" if notes else " and figures"))
    print(f"  {s['input']['name']}: {m['sparsity']:.2%} pruned, {m['fully_pruned_heads']}/{m['total_heads']} "
          f"heads fully pruned, low-frequency share {'n/a' if share is None else f'{share:.1%}'}")
    for c in s.get("comparisons", []):
        print(f"  vs {c['b']}: Jaccard {c['jaccard']:.3f} (random {c['jaccard_if_random']:.3f})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``analyze`` to the ``leank`` command line."""
    p = subparsers.add_parser("analyze", help="importance analysis of a mask or stage-1 α: figures and numbers")
    p.add_argument("input", metavar="ALPHA_OR_MASK", help="alpha.safetensors (stage-1 α) or a mask .safetensors")
    p.add_argument("--compare", nargs="+", action="extend", default=[], metavar="OTHER_MASK",
                   help="masks (or α) of the same shape to compare against")
    p.add_argument("--out", default="analysis", help="output directory (default: ./analysis)")
    p.add_argument("--sparsity", type=float, default=DEFAULT_SPARSITY,
                   help=f"binarise α inputs to this sparsity (default {DEFAULT_SPARSITY}; masks are used as they are)")
    p.add_argument("--align", type=int, default=DEFAULT_ALIGNMENT,
                   help=f"alignment of per-head kept counts when binarising α (default {DEFAULT_ALIGNMENT})")
    p.set_defaults(run=main)
    return p
