"""LeanK channel masks: which post-RoPE K channels each (layer, KV head) keeps.

A ``ChannelMask`` is a bool tensor ``[layers, kv_heads, head_dim]`` (True = kept) plus
metadata: the model layers its rows compress (``layers``: the full-attention layers of a
hybrid model; None = every layer, in order), the model it was learned for, the alignment
of per-head kept counts, the sink and recent sizes it was trained with, and how it was made.
It saves to ``.safetensors`` (one tensor ``mask``, uint8, metadata as JSON strings) atomically, and also loads the
authors' released masks (a bare ``mask`` tensor, no metadata).

    mask = ChannelMask.load("smollm2.leank-mask.safetensors")
    print(mask.summary())
    mask = binarize(alpha, sparsity=0.7, alignment=16)
"""

from __future__ import annotations

import datetime as _dt
import json
import numbers
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ._defaults import DEFAULT_RECENT, DEFAULT_SINK
from ._io import atomic_write
from .architectures import compressed_layers, kv_heads_and_dim, text_config
from .errors import LeanKError


def kv_shape(config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a transformers config's masks: ``layers`` counts the
    layers LeanK compresses (every layer, or a hybrid model's full-attention layers)."""
    return (len(compressed_layers(config)), *kv_heads_and_dim(config))


def hybrid_layers(config) -> tuple[int, ...] | None:
    """The compressed layers of a hybrid model (a mask's ``layers`` metadata), None when all are."""
    layers = compressed_layers(config)
    return None if len(layers) == text_config(config).num_hidden_layers else layers


def check_sparsity(sparsity) -> float:
    """``sparsity`` as a float in [0, 1): Python, NumPy or 0-d torch numbers; bools and NaN refused."""
    value = None
    if isinstance(sparsity, torch.Tensor):
        if sparsity.numel() == 1 and sparsity.dtype != torch.bool and not sparsity.is_complex():
            value = float(sparsity.item())
    elif isinstance(sparsity, numbers.Real) and not isinstance(sparsity, (bool, np.bool_)):
        value = float(sparsity)
    if value is None or not 0.0 <= value < 1.0:  # NaN fails the comparison
        raise LeanKError(f"sparsity must be in [0, 1), got {sparsity!r}: pass e.g. 0.7 to prune 70% of channels")
    return value + 0.0  # -0.0 is 0.0


def check_alignment(alignment: int, head_dim: int) -> int:
    if not isinstance(alignment, int) or alignment < 1 or head_dim % alignment:
        raise LeanKError(
            f"alignment {alignment!r} does not divide head_dim {head_dim}: use a divisor such as 16 or 32"
        )
    return alignment


def check_window(sink: int, recent: int) -> None:
    for name, value in (("sink", sink), ("recent", recent)):
        if not isinstance(value, int) or value < 0:
            raise LeanKError(f"{name} must be a non-negative number of tokens, got {value!r}")


@dataclass(frozen=True)
class ChannelMask:
    """Bool ``kept[layers, kv_heads, head_dim]`` plus how it was made.

    ``sink`` and ``recent`` are the window sizes the mask was learned with; a cache uses
    them unless told otherwise.
    """

    kept: torch.Tensor
    model: str | None = None
    alignment: int = 1
    sink: int = DEFAULT_SINK
    recent: int = DEFAULT_RECENT
    method: str = "unknown"
    info: dict = field(default_factory=dict)
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        kept = self.kept
        if not isinstance(kept, torch.Tensor) or kept.dim() != 3:
            raise LeanKError("a channel mask must be a 3-D tensor [layers, kv_heads, head_dim]")
        if kept.dtype != torch.bool:
            if kept.is_floating_point() or kept.is_complex():
                raise LeanKError("a channel mask must be boolean (or 0/1 integers); binarise scores first")
            if ((kept != 0) & (kept != 1)).any():
                raise LeanKError("a channel mask must hold only 0 and 1")
            kept = kept != 0
        object.__setattr__(self, "kept", kept.detach().to("cpu", torch.bool).contiguous())
        check_alignment(self.alignment, self.head_dim)
        check_window(self.sink, self.recent)
        if self.layers is not None:
            try:
                layers = tuple(int(i) for i in self.layers)
            except (TypeError, ValueError):
                raise LeanKError(f"mask layers must be model layer indices, got {self.layers!r}") from None
            if len(layers) != kept.shape[0] or sorted(set(layers)) != list(layers) or min(layers, default=0) < 0:
                raise LeanKError(f"mask layers {list(layers)} must be {kept.shape[0]} ascending model layer "
                                 "indices, one per mask row")
            object.__setattr__(self, "layers", layers)

    # ---- shape ---------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.kept.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kept.shape[1]

    @property
    def head_dim(self) -> int:
        return self.kept.shape[2]

    @property
    def model_layers(self) -> tuple[int, ...]:
        """The model layer of each row: ``layers``, or ``0 .. num_layers - 1``."""
        return self.layers if self.layers is not None else tuple(range(self.num_layers))

    # ---- statistics ----------------------------------------------------------
    @property
    def kept_counts(self) -> torch.Tensor:
        """Kept channels per head, long ``[layers, kv_heads]``."""
        return self.kept.sum(-1)

    @property
    def kept_fraction(self) -> float:
        return self.kept.float().mean().item()

    @property
    def sparsity(self) -> float:
        """Fraction of K channels pruned."""
        return 1.0 - self.kept_fraction

    @property
    def fully_pruned_heads(self) -> int:
        return int((self.kept_counts == 0).sum())

    def count_histogram(self) -> dict[int, int]:
        """Number of heads per kept-channel count, ascending."""
        return dict(sorted(Counter(self.kept_counts.flatten().tolist()).items()))

    @property
    def v_kept_fraction(self) -> float:
        """Fraction of heads whose V is stored for middle tokens (those keeping any channel)."""
        return (self.kept_counts > 0).float().mean().item()

    @property
    def kv_bytes_fraction(self) -> float:
        """Bytes of a middle token's K and V kept, as a fraction of the dense K+V."""
        return (self.kept_fraction + self.v_kept_fraction) / 2

    def summary(self) -> dict:
        return {
            "model": self.model,
            "shape": list(self.kept.shape),
            "method": self.method,
            "alignment": self.alignment,
            "sink": self.sink,
            "recent": self.recent,
            **({"layers": list(self.layers)} if self.layers is not None else {}),
            "sparsity": round(self.sparsity, 6),
            "fully_pruned_heads": self.fully_pruned_heads,
            "total_heads": self.num_layers * self.num_kv_heads,
            "heads_by_kept_count": self.count_histogram(),
            "kv_bytes_fraction_middle": round(self.kv_bytes_fraction, 6),
            **({"info": self.info} if self.info else {}),
        }

    # ---- construction --------------------------------------------------------
    @classmethod
    def full(cls, num_layers: int, num_kv_heads: int, head_dim: int, **meta) -> ChannelMask:
        """A mask that keeps every channel (LeanK then equals dense attention)."""
        return cls(torch.ones(num_layers, num_kv_heads, head_dim, dtype=torch.bool), method="full", **meta)

    @classmethod
    def random(
        cls, num_layers: int, num_kv_heads: int, head_dim: int, *, sparsity: float, alignment: int = 1,
        generator: torch.Generator | None = None, **meta,
    ) -> ChannelMask:
        """Random scores binarised to ``sparsity`` (the 'random static mask' baseline)."""
        scores = torch.rand(num_layers, num_kv_heads, head_dim, generator=generator)
        return binarize(scores, sparsity=sparsity, alignment=alignment, method="random", **meta)

    def with_meta(self, **changes) -> ChannelMask:
        return replace(self, **changes)

    # ---- validation ----------------------------------------------------------
    def check_config(self, config) -> None:
        """Raise a ``LeanKError`` unless this mask fits a transformers model config."""
        expected = kv_shape(config)
        if tuple(self.kept.shape) != expected:
            hybrid = hybrid_layers(config)
            where = f" (its {expected[0]} full-attention layers {list(hybrid)})" if hybrid else ""
            raise LeanKError(
                f"mask shape {tuple(self.kept.shape)} (layers, kv_heads, head_dim) does not match the model's "
                f"{expected}{where}: this mask was made for {self.model or 'another model'}; use a mask for this "
                "model or make one with `leank train`"
            )
        hybrid = hybrid_layers(config)
        if hybrid is not None and self.layers is None:
            raise LeanKError(
                f"this model is hybrid (its full-attention layers are {list(hybrid)}) and the mask does not record "
                "which layers its rows are for: use a mask made for this model (leank train and leank calibrate "
                f"record them) or build it with layers={tuple(hybrid)}"
            )
        if self.layers is not None and self.layers != compressed_layers(config):
            raise LeanKError(
                f"this mask compresses layers {list(self.layers)}, but the model's full-attention layers are "
                f"{list(compressed_layers(config))}: use a mask made for this model"
            )

    # ---- persistence ---------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``.safetensors`` atomically (tmp file + rename)."""
        from safetensors.torch import save_file

        meta = {
            "format": "leank-mask-v1",
            "model": self.model or "",
            "alignment": str(self.alignment),
            "sink": str(self.sink),
            "recent": str(self.recent),
            "method": self.method,
            "sparsity": f"{self.sparsity:.6f}",
            "info": json.dumps(self.info, sort_keys=True),
            **({"layers": json.dumps(list(self.layers))} if self.layers is not None else {}),
        }
        tensors = {"mask": self.kept.to(torch.uint8)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> ChannelMask:
        """Read a mask saved by :meth:`save` or a bare ``mask`` tensor (the authors' format)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise LeanKError(f"mask file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if "mask" not in f.keys():
                    raise LeanKError(f"{path} holds no tensor named 'mask': is it a LeanK mask file?")
                kept = f.get_tensor("mask")
        except LeanKError:
            raise
        except Exception as e:  # safetensors raises several types for corrupt files
            raise LeanKError(f"cannot read mask file {path}: not a valid .safetensors file ({e})") from None
        try:
            info = json.loads(meta.get("info", "{}"))
            return cls(
                kept,
                model=meta.get("model") or None,
                alignment=int(meta.get("alignment", 1)),
                sink=int(meta.get("sink", DEFAULT_SINK)),
                recent=int(meta.get("recent", DEFAULT_RECENT)),
                method=meta.get("method", "unknown"),
                info=info,
                layers=tuple(json.loads(meta["layers"])) if meta.get("layers") else None,
            )
        except LeanKError as e:
            raise LeanKError(f"{path}: {e}") from None
        except (ValueError, TypeError) as e:
            raise LeanKError(f"{path}: corrupt mask metadata ({e})") from None


def aligned_counts(scores: torch.Tensor, sparsity: float, alignment: int) -> torch.Tensor:
    """Per-head kept counts for a global budget (DESIGN.md §1, stage 2).

    The ``round(sparsity · N)`` lowest of all ``N`` scores are pruned (the global
    ``sparsity``-quantile); each head keeps the rest of its channels, rounded to the
    nearest multiple of ``alignment``. Ties are broken by a fixed order — among equal
    scores, the entry with the larger flat index (later layer, head, channel) is pruned
    first — so the budget is met whatever the scores (a constant α included), and each
    head's count moves by at most ``alignment / 2`` in the rounding.
    Returns long ``[layers, kv_heads]``.
    """
    flat = scores.detach().float().flatten().cpu()
    if torch.isnan(flat).any():
        raise LeanKError("channel scores contain NaN: cannot rank channels (did training diverge?)")
    num_pruned = round(check_sparsity(sparsity) * flat.numel())
    # Ascending stable sort of the reversed scores: ties come out by descending flat index.
    order = flat.numel() - 1 - flat.flip(0).argsort(stable=True)
    pruned = torch.zeros(flat.numel(), dtype=torch.long)
    pruned[order[:num_pruned]] = 1
    counts = scores.shape[-1] - pruned.view(scores.shape).sum(-1)
    return (torch.floor(counts.double() / alignment + 0.5) * alignment).long().clamp(0, scores.shape[-1])


def mask_from_counts(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep each head's ``counts`` highest-scoring channels; bool like ``scores``."""
    order = scores.detach().float().cpu().argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order).contiguous())
    return rank < counts.unsqueeze(-1)


def binarize(
    scores: torch.Tensor, *, sparsity: float, alignment: int = 1, per_head: bool = False, **meta
) -> ChannelMask:
    """Binarise channel scores ``[layers, kv_heads, head_dim]`` to a target sparsity.

    Global budget (default): the stage-2 rule of DESIGN.md §1 (global quantile threshold,
    per-head count rounded to ``alignment``, top entries per head). ``per_head=True``:
    every head keeps the same number of channels, ``(1 - sparsity) * head_dim`` rounded
    to ``alignment``.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3:
        raise LeanKError("scores must be a 3-D tensor [layers, kv_heads, head_dim]")
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise LeanKError("channel scores contain NaN: cannot rank channels (did training diverge?)")
    sparsity = check_sparsity(sparsity)
    head_dim = scores.shape[-1]
    check_alignment(alignment, head_dim)
    if per_head:
        keep = int(torch.floor(torch.tensor((1 - sparsity) * head_dim / alignment + 0.5)).item()) * alignment
        counts = torch.full(scores.shape[:-1], keep, dtype=torch.long)
    else:
        counts = aligned_counts(scores, sparsity, alignment)
    meta.setdefault("method", "binarized-per-head" if per_head else "binarized")
    info = dict(meta.pop("info", {}))
    info.setdefault("target_sparsity", sparsity)
    info.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return ChannelMask(mask_from_counts(scores, counts), alignment=alignment, info=info, **meta)


def with_count_distribution(scores: torch.Tensor, fractions: dict[int, float], **meta) -> ChannelMask:
    """A mask whose heads follow a kept-count distribution (``{count: fraction of heads}``),
    heads ranked by total score (lowest get the smallest counts), channels by score.

    Used to give a small model the head structure of a learned mask at 8B scale (e.g. the
    authors' Llama-3.1-8B mask) for memory and kernel measurements.
    """
    order = scores.detach().float().sum(-1).flatten().argsort().tolist()
    n = len(order)
    items = sorted(fractions.items())
    sizes = [round(frac * n) for _, frac in items[:-1]]
    sizes.append(n - sum(sizes))
    counts = torch.empty(n, dtype=torch.long)
    start = 0
    for (kept, _), size in zip(items, sizes, strict=True):
        counts[order[start : start + size]] = kept
        start += size
    meta.setdefault("method", "count-distribution")
    return ChannelMask(mask_from_counts(scores, counts.view(scores.shape[:2])), **meta)


# Kept-count distribution of the authors' Llama-3.1-8B-Instruct mask (leank/masks/),
# as fractions of head_dim: 0, 1/4, 1/2, 3/4 kept for 47, 120, 67, 22 of 256 heads.
AUTHORS_LLAMA_DISTRIBUTION = {0: 47 / 256, 1: 120 / 256, 2: 67 / 256, 3: 22 / 256}


def authors_like_mask(scores: torch.Tensor, **meta) -> ChannelMask:
    """:func:`with_count_distribution` with the authors' Llama head structure, scaled to head_dim."""
    quarter = scores.shape[-1] // 4
    fractions = {k * quarter: f for k, f in AUTHORS_LLAMA_DISTRIBUTION.items()}
    meta.setdefault("method", "authors-llama-distribution")
    return with_count_distribution(scores, fractions, alignment=quarter, **meta)
