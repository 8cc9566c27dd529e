"""The ``"leank"`` attention implementation for transformers, and the prefill-then-decode
protocol every LeanK-style cache follows.

Importing this module registers ``"leank"`` with ``AttentionInterface`` (the function
below) and ``AttentionMaskInterface`` (transformers' SDPA mask, so padding masks reach
us). :func:`enable` switches a model to it.

**The protocol.** A cache layer's ``update()`` returns a :class:`Handle` in place of K and
V. The attention function then

* for a handle with ``prompt`` K/V (the first update of a sequence): runs transformers' own
  SDPA over them (prefill is ordinary full attention), reads each row's leading pad count
  from the mask and calls ``layer.after_prefill(query, pads)`` (the layer compresses);
* otherwise calls ``layer.attend(query, scaling, attention_mask, softcap=..., sinks=...)`` →
  ``[B, H_q, q, D]``: each cache implements only this (``softcap``: the model's score
  soft-capping or None; ``sinks``: its learned per-query-head sink logits ``[H_q]`` or None;
  see :mod:`leank.architectures`).

Plain tensors (no cache handle: training, sliding-window layers) and the prompt go to
:func:`dense_attention`: transformers' SDPA, or the model's own eager attention where its
scores have a term SDPA cannot express (soft-capping, learned sinks);
``leank_observer=fn`` in the forward kwargs first shows ``fn(layer_idx, query, key)`` the
post-RoPE Q and K (mask calibration).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .architectures import check_supported
from .errors import LeanKError

ATTN_NAME = "leank"
__all__ = ["ATTN_NAME", "Handle", "check_supported", "dense_attention", "enable", "leank_attention"]


@dataclass(frozen=True)
class Handle:
    """What a cache layer's ``update()`` returns (as both K and V): the layer, and the
    prompt's K/V ``[B, H_kv, T, D]`` when this is the sequence's first update."""

    layer: object
    prompt: tuple[torch.Tensor, torch.Tensor] | None = None


def pads_from_mask(attention_mask: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """Leading pad tokens per row ``[B]``, read from the last query row of the prompt's mask."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    row = attention_mask[:, 0, -1, :]
    visible = row if row.dtype == torch.bool else row == 0
    return visible.int().argmax(-1).expand(batch).to(device, torch.long)


def dense_attention(module, query, key, value, attention_mask, *, scaling: float, dropout: float = 0.0, **kwargs):
    """Ordinary attention over plain K/V ``[B, H_kv, T, D]`` → ``([B, q, H_q, D], None)``: SDPA, or
    the model's own eager attention when ``softcap`` or ``s_aux`` (learned sinks) is set."""
    if kwargs.get("softcap") is None and kwargs.get("s_aux") is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise LeanKError(f"{type(module).__name__} passes soft-capping or sinks but its module has no "
                         "eager_attention_forward: LeanK cannot run this architecture")
    q, T = query.shape[2], key.shape[2]
    if attention_mask is None:  # SDPA's mask skip means "causal, no padding"; eager needs it spelled out
        attention_mask = torch.ones(q, T, dtype=torch.bool, device=query.device).tril(T - q)[None, None]
    if attention_mask.dtype == torch.bool:  # our mask interface is SDPA's (bool); eager adds a float mask
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~attention_mask, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask[..., :T], scaling=scaling, dropout=dropout, **kwargs)


def leank_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """transformers attention function; see the module docstring."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if isinstance(key, Handle):
        if key.prompt is not None:
            out, _ = dense_attention(module, query, *key.prompt, attention_mask, scaling=scaling, dropout=dropout,
                                     **kwargs)
            key.layer.after_prefill(query, pads_from_mask(attention_mask, query.shape[0], query.device))
            return out, None
        out = key.layer.attend(query, scaling, attention_mask, softcap=kwargs.get("softcap"),
                               sinks=kwargs.get("s_aux"))
        return out.transpose(1, 2).contiguous(), None
    observer = kwargs.pop("leank_observer", None)
    if observer is not None:
        observer(module.layer_idx, query, key)
    return dense_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


AttentionInterface.register(ATTN_NAME, leank_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def enable(model) -> None:
    """Switch a transformers model to the ``"leank"`` attention (idempotent)."""
    check_supported(model.config)
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
