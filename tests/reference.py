"""An independent reference for LeanK decoding: masked dense attention.

One forward pass over the whole generated sequence, with an eager attention written
from the definition: prompt queries attend densely; a decode query at position ``t``
sees every real key ``p <= t`` of its row at full precision when ``p`` is among the
row's first ``sink`` real tokens or ``t - p <= recent``, and otherwise through the kept
channels of its KV head only (not at all when the head keeps none). Layers without a mask
row (a hybrid model's sliding-window layers) attend densely. The model's own terms are
applied as it passes them: ``scaling``, soft-capping ``cap * tanh(s / cap)`` (``softcap``),
a sliding window (query ``t`` sees ``p`` only when ``t - p < window``: ``sliding_window``)
and learned sinks (``s_aux``: one more logit per query head in the softmax, no value).
The rule is written out here, not imported from the library. Everything is computed in
float64. With a quantised middle store (``stored``: per layer, the dequantised middle K/V a
test read out of the cache with its own code, and the step of each value), every key seen
through its kept channels is seen as stored: its kept K channels and its V taken from
there, after checking that they are within half a step of the true K/V.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

NAME = "leank_test_reference"


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    plan = kwargs["leank_reference_plan"]
    pads, prompt_len, sink, recent = plan["pads"], plan["prompt_len"], plan["sink"], plan["recent"]
    B, Hq, T, D = query.shape
    H = key.shape[1]
    G = Hq // H
    kept = plan["kept"].get(module.layer_idx)  # [H, D], None: a dense layer
    dense = kept is None
    kept = torch.ones(H, D, dtype=torch.float64) if dense else kept.to(torch.float64)
    window, softcap, sinks = kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux")
    q = query.double()
    k = key.double().repeat_interleave(G, dim=1)
    v = value.double().repeat_interleave(G, dim=1)
    kept_q = kept.repeat_interleave(G, dim=0)  # [Hq, D]
    full = torch.einsum("bhtd,bhpd->bhtp", q, k) * scaling
    stored = plan.get("stored", {}).get(module.layer_idx)
    v_masked = v
    if stored is not None:  # the middle as stored: checked against the true K/V, then used
        kq, vq, known, k_step, v_step = (x[:, :, :T] for x in stored)
        kk = vk = known[..., None]
        rotation = plan.get("rotation", {}).get(module.layer_idx)  # [H, D, D]: K stored as key @ rotation[h]
        true_k = key.double() if rotation is None else torch.einsum("bhtd,hde->bhte", key.double(), rotation)
        k_err = ((kq - true_k) * kept[None, :, None, :]).abs().masked_fill(~kk, 0)
        v_err = (vq - value.double()).abs().masked_fill(~vk, 0)
        k_over, v_over = (k_err - k_step / 2).max().item(), (v_err - v_step / 2).max().item()
        assert k_over <= 1e-5 and v_over <= 1e-5, f"stored middle is off by {k_over:.3g} (K), {v_over:.3g} (V)"
        if rotation is not None:  # back to the model's basis (orthonormal: the inverse is the transpose)
            kq = torch.einsum("bhte,hde->bhtd", kq, rotation)
        k = torch.where(kk, kq, key.double()).repeat_interleave(G, dim=1)
        v_masked = torch.where(vk, vq, value.double()).repeat_interleave(G, dim=1)
    masked = torch.einsum("bhtd,bhpd->bhtp", q, k * kept_q[None, :, None, :]) * scaling
    if softcap is not None:
        full, masked = softcap * torch.tanh(full / softcap), softcap * torch.tanh(masked / softcap)

    t = torch.arange(T)[:, None]
    p = torch.arange(T)[None, :]
    use_full = torch.zeros(B, 1, T, T, dtype=torch.bool)
    visible = torch.zeros(B, Hq, T, T, dtype=torch.bool)
    head_has_channels = (kept_q.sum(-1) > 0)[None, :, None, None]
    for b, pad in enumerate(pads):
        real = (p >= pad) & (p <= t)
        if window is not None:
            real = real & (t - p < window)
        is_full = (t < prompt_len) | (p - pad < sink) | (t - p <= recent) | dense
        use_full[b, 0] = is_full
        visible[b] = real & (is_full | head_has_channels[0])
    scores = torch.where(use_full, full, masked).masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.double().view(1, Hq, 1, 1).expand(B, Hq, T, 1)], -1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)[..., :T]  # pad query rows see nothing
    if stored is not None:  # every key seen through its kept channels must be in the middle store
        seen_masked = visible & ~use_full & ~known.repeat_interleave(G, dim=1)[:, :, None, :]
        assert not seen_masked.any(), "a middle key was not stored"
    out = (torch.einsum("bhtp,bhpd->bhtd", probs * use_full, v)
           + torch.einsum("bhtp,bhpd->bhtd", probs * ~use_full, v_masked)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, _reference_attention)


def reference_logits(model, sequences, attention_mask, *, kept, prompt_len, sink, recent, layers=None, stored=None,
                     rotation=None):
    """Logits ``[B, T, V]`` of the masked-dense reference for full ``sequences`` ``[B, T]``.
    ``kept`` ``[rows, H, D]``: row ``i`` is model layer ``layers[i]`` (default: layer ``i``).
    ``stored``: per row, a quantised middle store read out of a cache (module docstring):
    ``(K, V, known, K step, V step)`` float64 ``[B, H, T', D]`` (``known`` bool ``[B, H, T']``).
    ``rotation``: per row, float64 ``[H, D, D]`` orthonormal matrices the stored K was multiplied by
    (``K @ rotation[h]``), or None."""
    layers = range(len(kept)) if layers is None else layers
    pads = (attention_mask[:, :prompt_len] == 0).sum(-1).tolist()
    full_mask = torch.cat(
        [attention_mask, attention_mask.new_ones(sequences.shape[0], sequences.shape[1] - prompt_len)], dim=1
    )
    position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
    plan = {
        "kept": dict(zip(layers, kept, strict=True)), "pads": pads, "prompt_len": prompt_len, "sink": sink,
        "recent": recent,
    }
    if stored is not None:
        plan["stored"] = dict(zip(layers, stored, strict=True))
    if rotation is not None:
        plan["rotation"] = dict(zip(layers, rotation, strict=True))
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        with torch.no_grad():
            out = model(
                input_ids=sequences, attention_mask=full_mask, position_ids=position_ids,
                use_cache=False, leank_reference_plan=plan,
            )
    finally:
        model.set_attn_implementation(previous)
    return out.logits
