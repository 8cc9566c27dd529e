"""The ``"leank"`` attention implementation for transformers, and the decode dispatch point.

Importing this module registers ``"leank"`` with ``AttentionInterface`` (the function
below) and ``AttentionMaskInterface`` (transformers' SDPA mask, so padding masks reach
us). :func:`enable` switches a model to it. The function handles three cases:

* K/V from a :class:`~leank.cache.LeanKCache` (a :class:`~leank.cache.LeanKHandle`):
  the prompt runs as plain SDPA, then the layer compresses itself; later steps run
  :func:`decode_attention` over sink + middle (kept channels) + window in one softmax;
* plain tensors with ``leank_observer=fn`` in the forward kwargs: ``fn(layer_idx, query,
  key)`` sees the post-RoPE Q and K (mask calibration), then SDPA;
* plain tensors otherwise: SDPA, exactly as transformers' ``"sdpa"``.

:func:`decode_attention` is the one dispatch point between backends: ``"torch"`` (exact,
CPU and GPU) and faster ones registered in :data:`BACKENDS`. ``LEANK_ATTENTION_BACKEND``
or the ``backend`` argument overrides the automatic choice.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import LeanKHandle, LeanKLayer
from .errors import LeanKError

ATTN_NAME = "leank"


def decode_attention_torch(query: torch.Tensor, layer: LeanKLayer, scaling: float) -> torch.Tensor:
    """Exact LeanK attention of the last ``q`` tokens, in fp32, with plain torch ops.

    ``query`` ``[B, H_q, q, D]`` → ``[B, H_q, q, D]``. Query head ``j`` uses KV head
    ``j // (H_q / H_kv)``. Middle scores use only each head's kept channels; heads that
    keep none skip the middle tokens.
    """
    B, Hq, q, D = query.shape
    H = layer.num_kv_heads
    G = Hq // H
    qf = query.float().view(B, H, G, q, D)
    neg = float("-inf")
    scores, values = [], []

    if layer.sink_k is not None:
        s = torch.einsum("bhgqd,bhkd->bhgqk", qf, layer.sink_k.float()) * scaling
        scores.append(s.masked_fill(~layer.sink_valid()[:, None, None, None, :], neg))
        values.append(("dense", layer.sink_v))

    M = layer.middle_len
    if M:
        s_mid = qf.new_full((B, H, G, q, M), neg)
        for g in layer.groups:
            qg = qf.index_select(1, g.heads)
            qg = qg.gather(-1, g.channels[None, :, None, None, :].expand(B, -1, G, q, -1))
            s_mid[:, g.heads] = torch.einsum("bngqc,bnkc->bngqk", qg, g.keys[:, :, :M].float()) * scaling
        scores.append(s_mid.masked_fill(~layer.middle_valid()[:, None, None, None, :], neg))
        values.append(("middle", None))

    W = layer.window_len
    s = torch.einsum("bhgqd,bhkd->bhgqk", qf, layer.window_k[:, :, :W].float()) * scaling
    scores.append(s.masked_fill(~layer.window_valid(q)[:, None, None], neg))
    values.append(("dense", layer.window_v[:, :, :W]))

    probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
    out = qf.new_zeros(B, H, G, q, D)
    start = 0
    for s, (kind, v) in zip(scores, values, strict=True):
        p = probs[..., start : start + s.shape[-1]]
        start += s.shape[-1]
        if kind == "dense":
            out += torch.einsum("bhgqk,bhkd->bhgqd", p, v.float())
        else:
            for g in layer.groups:
                pg = p.index_select(1, g.heads)
                out.index_add_(1, g.heads, torch.einsum("bngqk,bnkd->bngqd", pg, g.values[:, :, :M].float()))
    return out.view(B, Hq, q, D).to(query.dtype)


BACKENDS: dict[str, Callable[[torch.Tensor, LeanKLayer, float], torch.Tensor]] = {"torch": decode_attention_torch}


def pick_backend(query: torch.Tensor, backend: str | None = None) -> str:
    backend = backend or os.environ.get("LEANK_ATTENTION_BACKEND") or "auto"
    if backend == "auto":
        return "triton" if query.is_cuda and "triton" in BACKENDS else "torch"
    if backend not in BACKENDS:
        raise LeanKError(f"unknown LeanK attention backend {backend!r}: use one of auto, {', '.join(BACKENDS)}")
    return backend


def decode_attention(
    query: torch.Tensor, layer: LeanKLayer, scaling: float, *, backend: str | None = None
) -> torch.Tensor:
    """LeanK attention of new queries ``[B, H_q, q, D]`` over a layer's cache → ``[B, H_q, q, D]``."""
    return BACKENDS[pick_backend(query, backend)](query, layer, scaling)


def pads_from_mask(attention_mask: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """Leading pad tokens per row, read from the last query row of the prompt's mask."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    row = attention_mask[:, 0, -1, :]
    visible = row if row.dtype == torch.bool else row == 0
    return visible.int().argmax(-1).expand(batch).to(torch.long)


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
    if isinstance(key, LeanKHandle):
        layer = key.layer
        if layer.prefill_pending:
            out, _ = sdpa_attention_forward(
                module, query, layer.window_k, layer.window_v, attention_mask, scaling=scaling, dropout=dropout
            )
            layer.finish_prefill(pads_from_mask(attention_mask, query.shape[0], query.device))
            return out, None
        out = decode_attention(query, layer, scaling)
        layer.evict()
        return out.transpose(1, 2).contiguous(), None
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
