"""Exact LeanK decode attention with plain torch ops (CPU and GPU): the reference backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..cache import LeanKLayer


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
