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
* otherwise calls ``layer.attend(query, scaling, attention_mask)`` → ``[B, H_q, q, D]``:
  each cache implements only this.

Plain tensors (no cache handle) go to SDPA, exactly as transformers' ``"sdpa"``;
``leank_observer=fn`` in the forward kwargs first shows ``fn(layer_idx, query, key)`` the
post-RoPE Q and K (mask calibration).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .errors import LeanKError

ATTN_NAME = "leank"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


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
            out, _ = sdpa_attention_forward(
                module, query, *key.prompt, attention_mask, scaling=scaling, dropout=dropout
            )
            key.layer.after_prefill(query, pads_from_mask(attention_mask, query.shape[0], query.device))
            return out, None
        return key.layer.attend(query, scaling, attention_mask).transpose(1, 2).contiguous(), None
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
    check_supported(model.config)
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)


def check_supported(config) -> None:
    """Refuse architectures whose attention LeanK does not handle, with the reason."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LeanKError(
            f"model type {model_type!r} is not supported by LeanK: use one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-, Qwen2-, Qwen3- or Mistral-architecture models)"
        )
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None)
    uses_sliding = any(t != "full_attention" for t in layer_types)
    if model_type == "mistral" and sliding is not None:
        uses_sliding = True
    if model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        uses_sliding = True
    if uses_sliding:
        raise LeanKError(
            f"this {model_type} config uses sliding-window attention (sliding_window={sliding}), which "
            "LeanK does not support: set config.sliding_window = None (full attention) or use another model"
        )
