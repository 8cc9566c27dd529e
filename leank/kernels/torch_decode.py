"""Exact LeanK attention with plain torch ops (CPU and GPU): the reference backend.

Reads a :class:`~leank.contract.DecodeView` by the contract's layout and applies the
contract's :func:`~leank.contract.in_full` rule to every key; computed in fp32. A quantised
middle store is dequantised with :func:`leank.quant.dequantize`.
"""

from __future__ import annotations

import torch

from ..contract import DecodeView, capped, in_full
from ..quant import dequantize, quantize


def middle_keys(view: DecodeView, h: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head ``h``'s first ``length`` middle tokens: packed K ``[B, length, c]`` and V ``[B, length, D]``
    (fp32, dequantised, when the store is quantised)."""
    c, D, slots = view.head_counts[h], view.ring_k.shape[-1], view.slots
    quant = view.quant()
    if quant is not None:
        kb, kp, vb, vp = quant.row_bytes(c), quant.row_params(c), quant.row_bytes(D), quant.row_params(D)
        koff, kpoff, voff = int(view.head_koff[h]) * slots, int(view.head_kpoff[h]) * slots, int(view.head_voff[h])
        k = dequantize(view.mid_k[:, koff : koff + length * kb].view(-1, length, kb),
                       view.mid_kp[:, kpoff : kpoff + length * kp].view(-1, length, kp), c, quant)
        v = dequantize(view.mid_v[:, voff * slots * vb :][:, : length * vb].view(-1, length, vb),
                       view.mid_vp[:, voff * slots * vp :][:, : length * vp].view(-1, length, vp), D, quant)
        return k, v
    koff, voff = int(view.head_koff[h]) * slots, int(view.head_voff[h]) * slots * D
    k = view.mid_k[:, koff : koff + length * c].view(-1, length, c)
    v = view.mid_v[:, voff : voff + length * D].view(-1, length, D)
    return k, v


def decode_attention_torch(
    query: torch.Tensor, view: DecodeView, scaling: float, *, softcap: float | None = None,
    sinks: torch.Tensor | None = None, pending: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """LeanK attention ``[B, H_q, q, D]`` of queries ``[B, H_q, q, D]`` over a layer's stores.

    Without ``pending`` the queries are the last ``q`` stored tokens (a decode step: ``q = 1``).
    With ``pending`` = (K, V) ``[B, H_kv, q, D]`` the queries are ``q`` new tokens not yet
    stored (a multi-token step after the prompt): they see the stores and each other,
    causally. Query head ``j`` uses KV head ``j // (H_q / H_kv)``. ``softcap`` and ``sinks``
    ``[H_q]``: the model's score terms (:mod:`leank.contract`), or None.
    """
    B, Hq, q, D = query.shape
    H, R1 = view.ring_k.shape[1], view.ring_k.shape[2]
    G = Hq // H
    dev = query.device
    seen, c0, pads, S = int(view.seen), int(view.c0), view.pads, view.sink
    n_out = seen - R1
    t = torch.arange(q, device=dev) + (seen if pending is not None else seen - q)  # query positions
    qf = query.float().view(B, H, G, q, D)
    kept = torch.zeros(H, D, device=dev)
    for h, c in enumerate(view.head_counts):
        kept[h, view.head_chan[h, :c].long()] = 1.0
    neg = float("-inf")
    scores, values = [], []  # per block of keys: [B, H, G, q, n] scores and [B, H, n, D] values

    # Sink: always in full.
    if S:
        slot = torch.arange(S, device=dev)
        valid = slot[None] < (n_out - pads).clamp(0, S)[:, None]  # [B, S]
        s = capped(torch.einsum("bhgqd,bhkd->bhgqk", qf, view.sink_k[:, :, :S].float()) * scaling, softcap)
        scores.append(s.masked_fill(~valid[:, None, None, None], neg))
        values.append(view.sink_v[:, :, :S].float())

    # Middle: only kept channels (never in full: these keys are more than `recent` behind).
    M = max(0, n_out - c0)
    if M:
        valid = (c0 + torch.arange(M, device=dev))[None] >= (pads + S)[:, None]  # [B, M]
        s_mid = qf.new_full((B, H, G, q, M), neg)
        v_mid = qf.new_zeros(B, H, M, D)
        for h, c in enumerate(view.head_counts):
            if c:
                k, v = middle_keys(view, h, M)
                qh = qf[:, h][..., view.head_chan[h, :c].long()]  # [B, G, q, c]
                s_mid[:, h] = capped(torch.einsum("bgqc,bkc->bgqk", qh, k.float()) * scaling, softcap)
                v_mid[:, h] = v.float()
        scores.append(s_mid.masked_fill(~valid[:, None, None, None], neg))
        values.append(v_mid)

    # Ring (and pending tokens): full K stored; the rule decides full or kept channels.
    pos = torch.arange(max(0, n_out), seen, device=dev)
    k_full = view.ring_k[:, :, pos % R1].float()
    v_full = view.ring_v[:, :, pos % R1].float()
    if pending is not None:
        pos = torch.cat([pos, t])
        k_full = torch.cat([k_full, pending[0].float()], 2)
        v_full = torch.cat([v_full, pending[1].float()], 2)
    full = torch.einsum("bhgqd,bhkd->bhgqk", qf, k_full)
    pruned = torch.einsum("bhgqd,bhkd->bhgqk", qf * kept[None, :, None, None], k_full)
    use_full = in_full(pos, t, pads, sink=S, recent=view.recent)[:, None, None]  # [B, 1, 1, q, T]
    visible = (pos[None, None] <= t[None, :, None]) & (pos[None, None] >= pads[:, None, None])  # [B, q, T]
    visible = visible[:, None, None] & (use_full | (kept.sum(-1) > 0)[None, :, None, None, None])
    s = capped(torch.where(use_full, full, pruned) * scaling, softcap)
    quant = view.quant()
    if quant is not None and pending is not None:
        # A quantised store: ring and pending keys seen through their kept channels are seen as
        # they will be stored (kept K channels and V quantised). A single decode query sees the
        # whole ring in full, so this only concerns multi-token steps.
        k_q, v_q = torch.zeros_like(k_full), v_full.clone()
        ring_k = view.ring_k.new_zeros(())  # the cache dtype: quantise what the store would hold
        for h, c in enumerate(view.head_counts):
            if c:
                chan = view.head_chan[h, :c].long()
                k_q[:, h][..., chan] = dequantize(*quantize(k_full[:, h][..., chan].to(ring_k.dtype), quant), c, quant)
                v_q[:, h] = dequantize(*quantize(v_full[:, h].to(ring_k.dtype), quant), D, quant)
        s_q = capped(torch.einsum("bhgqd,bhkd->bhgqk", qf, k_q) * scaling, softcap)
        scores += [s.masked_fill(~visible | ~use_full, neg), s_q.masked_fill(~visible | use_full, neg)]
        values += [v_full, v_q]
    else:
        scores.append(s.masked_fill(~visible, neg))
        values.append(v_full)

    if sinks is not None:  # one more logit per query head in the denominator, with no value
        scores.append(sinks.float().view(1, H, G, 1, 1).expand(B, H, G, q, 1))
        values.append(qf.new_zeros(B, H, 1, D))

    probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
    out = qf.new_zeros(B, H, G, q, D)
    start = 0
    for s, v in zip(scores, values, strict=True):
        out += torch.einsum("bhgqk,bhkd->bhgqd", probs[..., start : start + s.shape[-1]], v)
        start += s.shape[-1]
    return out.view(B, Hq, q, D).to(query.dtype)
