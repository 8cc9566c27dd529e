"""Static magnitude masks: channel importance from post-RoPE activation magnitudes.

The baseline LeanK must beat, and the mask bundled until a learned one exists. For each
(layer, KV head, channel) the score is ``||Q_c|| * ||K_c||``: the L2 norm over positions
(and the query heads sharing the KV head) of the post-RoPE query channel times that of
the key channel — the ThinK criterion, computed once over calibration text instead of per
prompt. Activations are read through the ``leank_observer`` hook of the LeanK attention.

    scores = channel_magnitudes(model, [ids1, ids2])
    mask = magnitude_mask(model, [ids1, ids2], sparsity=0.7, alignment=16)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from .architectures import compressed_layers
from .attention import enable
from .masks import ChannelMask, binarize, hybrid_layers, kv_shape


@torch.no_grad()
def channel_magnitudes(
    model, batches: Iterable[torch.Tensor], *, last_queries: int | None = None, progress: bool = True
) -> torch.Tensor:
    """Score ``[layers, kv_heads, head_dim]`` (float32, CPU) from token batches ``[B, T]``; row ``i``
    is the ``i``-th compressed layer (a hybrid model's sliding-window layers are not scored).

    ``last_queries``: use only the last that many query positions of each batch (queries
    that behave like decode steps); keys always use every position.
    """
    enable(model)
    layers, kv_heads, head_dim = kv_shape(model.config)
    q_sq = torch.zeros(layers, kv_heads, head_dim, dtype=torch.float64)
    k_sq = torch.zeros_like(q_sq)
    row_of = {layer: row for row, layer in enumerate(compressed_layers(model.config))}

    def observe(layer_idx: int, query: torch.Tensor, key: torch.Tensor) -> None:
        if layer_idx not in row_of:
            return
        layer_idx = row_of[layer_idx]
        if last_queries:
            query = query[:, :, -last_queries:]
        q = query.float().view(query.shape[0], kv_heads, -1, query.shape[2], head_dim)
        q_sq[layer_idx] += q.pow(2).sum(dim=(0, 2, 3)).double().cpu()
        k_sq[layer_idx] += key.float().pow(2).sum(dim=(0, 2)).double().cpu()

    device = next(model.parameters()).device
    for ids in tqdm(list(batches), desc="calibrating", disable=not progress):
        model(input_ids=ids.to(device), use_cache=False, leank_observer=observe)
    return (q_sq.sqrt() * k_sq.sqrt()).float()


def magnitude_mask(
    model, batches: Iterable[torch.Tensor], *, sparsity: float, alignment: int = 16, per_head: bool = False,
    last_queries: int | None = None, progress: bool = True, model_name: str | None = None,
    info: dict | None = None,
) -> ChannelMask:
    """A static mask from :func:`channel_magnitudes`: global budget, or per-head with ``per_head``."""
    scores = channel_magnitudes(model, batches, last_queries=last_queries, progress=progress)
    method = "magnitude-per-head" if per_head else "magnitude"
    return binarize(
        scores, sparsity=sparsity, alignment=alignment, per_head=per_head, method=method, model=model_name,
        layers=hybrid_layers(model.config), info=dict(info or {}),
    )
