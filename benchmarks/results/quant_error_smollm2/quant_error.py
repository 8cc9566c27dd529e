"""Which part of int4 costs accuracy, and would KIVI's per-channel K groups help? (issue 14)

A proxy on the real SmolLM2-135M on the CPU (fp32): the attention outputs of the last 48 prompt
positions of RULER-style prompts, in every layer, with the bundled 70% mask's LeanK attention (sink
32, recent 64; middle keys through their kept channels, empty heads skip the middle), against the same
with the middle store's K (kept channels) and/or V quantised in several formats:

* ``tok``: per token, groups of 32 along the row, symmetric int4 (the shipped ``int4s``: leank.quant);
* ``chan``: KIVI's K — per channel, groups of 32 consecutive middle tokens, symmetric int4 (written here).

Printed: the relative error ||o - o_leank|| / ||o_leank|| of each variant, averaged over layers,
prompts and tasks, and LeanK's own error against the dense attention for scale.

    python benchmarks/results/quant_error_smollm2/quant_error.py
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from leank.data.tasks import encode_prompt, generate_task
from leank.masks import ChannelMask
from leank.models import load_model
from leank.quant import KVQuant, dequantize, quantize
from leank.resources import bundled_mask_path

torch.manual_seed(0)
SINK, RECENT, QUERIES, LENGTH = 32, 64, 48, 4096
TASKS = ("niah_single_3", "niah_multikey_2", "niah_multivalue", "vt")
captured = {}


def capture(module, query, key, value, attention_mask, **kw):
    captured[module.layer_idx] = (query[:, :, -QUERIES:].detach(), key.detach(), value.detach(), kw.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


AttentionInterface.register("capture", capture)
model, tok = load_model("smollm2-135m", device="cpu", dtype="float32", attn_implementation="capture")
kept = ChannelMask.load(bundled_mask_path("smollm2-135m", 0.7)).kept  # [L, H, D]
INT4S = KVQuant(4, 32, symmetric=True)


def per_token(x):  # rows [..., n] -> dequantised, the shipped format
    codes, params = quantize(x, INT4S)
    return dequantize(codes, params, x.shape[-1], INT4S)


def per_channel(x, group=32):  # x [tokens, n]: symmetric int4 per channel over groups of tokens
    t = x.shape[0]
    pad = -t % group
    xp = F.pad(x, (0, 0, 0, pad)).view(-1, group, x.shape[1])
    scale = xp.abs().amax(1, keepdim=True) / 7
    q = torch.clamp(torch.floor(xp / torch.where(scale > 0, scale, 1) + 0.5), -8, 7)
    return (q * scale).view(-1, x.shape[1])[:t]


def attend(q, k, v, scaling, layer, k_mid=None, v_mid=None, dense=False):
    """Outputs [Hq, Q, D] of the last queries; k_mid/v_mid replace the middle tokens' K/V."""
    Hq, Qn = q.shape[1], q.shape[2]
    H, T = k.shape[1], k.shape[2]
    G = Hq // H
    i = torch.arange(T - Qn, T)[:, None]
    j = torch.arange(T)[None, :]
    full = (j < SINK) | (i - j <= RECENT)
    mid_lo, mid_hi = SINK, T - RECENT - 1  # tokens that left the recent window before the first query
    out = []
    for h in range(H):
        kh, vh = k[0, h].clone(), v[0, h].clone()
        if k_mid is not None:
            kh[mid_lo:mid_hi] = k_mid[h]
        if v_mid is not None:
            vh[mid_lo:mid_hi] = v_mid[h]
        keep = kept[layer, h]
        for g in range(G):
            qq = q[0, h * G + g]
            s_full = qq @ k[0, h].T
            s_mid = (qq * keep) @ (kh * keep).T
            s = s_full if dense else torch.where(full, s_full, s_mid)
            visible = j <= i
            if not dense and not keep.any():
                visible = visible & full
            s = (s * scaling).masked_fill(~visible, float("-inf"))
            p = s.softmax(-1)
            vv = v[0, h] if dense else torch.where(full[..., None], v[0, h][None], vh[None])  # [Q, T, D]
            out.append(torch.einsum("qt,qtd->qd", p, vv) if not dense else p @ vv)
    return torch.stack(out)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


variants = {
    "K tok, V -": ("tok", None), "K chan, V -": ("chan", None), "K -, V tok": (None, "tok"),
    "K tok, V tok (int4s)": ("tok", "tok"), "K chan, V tok": ("chan", "tok"),
}
totals = {name: [] for name in ["LeanK vs dense", *variants]}
for task in TASKS:
    for sample in generate_task(task, tok, LENGTH, 2, seed=0):
        ids = torch.tensor([encode_prompt(tok, sample.prompt)])
        captured.clear()
        with torch.no_grad():
            model.model(input_ids=ids)
        for layer, (q, k, v, scaling) in captured.items():
            T = k.shape[2]
            lean = attend(q, k, v, scaling, layer)
            totals["LeanK vs dense"].append(rel(lean, attend(q, k, v, scaling, layer, dense=True)))
            mid = slice(SINK, T - RECENT - 1)
            k_mid, v_mid = k[0, :, mid], v[0, :, mid]  # [H, M, D]
            for name, (kf, vf) in variants.items():
                km = vm = None
                if kf:  # quantise each head's kept channels
                    km = k_mid.clone()
                    for h in range(k.shape[1]):
                        cols = kept[layer, h].nonzero().flatten()
                        if len(cols):
                            part = k_mid[h][:, cols]
                            km[h][:, cols] = per_token(part) if kf == "tok" else per_channel(part)
                if vf:
                    vm = per_token(v_mid)
                totals[name].append(rel(attend(q, k, v, scaling, layer, km, vm), lean))
        print(task, sample.index, {n: round(sum(v) / len(v), 4) for n, v in totals.items()}, flush=True)
print("mean relative error of the attention outputs (over layers, prompts, tasks):")
for name, values in totals.items():
    print(f"  {name:24s} {sum(values) / len(values):.4f}  (n = {len(values)})")
