"""The ``"leank"`` attention implementation for transformers.

Importing this module registers ``"leank"`` with ``AttentionInterface`` (the function
below) and ``AttentionMaskInterface`` (transformers' SDPA mask, so padding masks reach
us). :func:`enable` switches a model to it. The function handles:

* K/V that are a cache *handle* (anything with ``attend``, e.g. from a
  :class:`~leank.cache.LeanKCache`): the handle computes attention itself — the prompt as
  plain SDPA, later steps with :func:`leank.kernels.decode_attention`;
* plain tensors with ``leank_observer=fn`` in the forward kwargs: ``fn(layer_idx, query,
  key)`` sees the post-RoPE Q and K (mask calibration), then SDPA;
* plain tensors otherwise: SDPA, exactly as transformers' ``"sdpa"``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "leank"


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
    if hasattr(key, "attend"):
        out = key.attend(module, query, attention_mask, scaling=scaling, dropout=dropout)
        return out, None
    observer = kwargs.pop("leank_observer", None)
    if observer is not None:
        observer(module.layer_idx, query, key)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


AttentionInterface.register(ATTN_NAME, leank_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def enable(model) -> None:
    """Switch a transformers model to the ``"leank"`` attention (idempotent)."""
    from .models import check_supported

    check_supported(model.config)
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
