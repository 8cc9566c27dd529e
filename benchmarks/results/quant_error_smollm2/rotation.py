"""Does rotating each head's kept K channels before int4 reduce the K-side error? (issue 14)

The proxy of ``quant_error.py`` (same model, bundled 70% mask, sink 32 / recent 64, prompts, tasks,
seed and metric): the attention outputs of the last 48 prompt positions in every layer, relative
error ||o - o_leank|| / ||o_leank|| against LeanK without quantisation, averaged over layers,
prompts and tasks. Here each head's kept K channels (middle tokens) are multiplied by an orthonormal
matrix R before the shipped symmetric int4 per-token quantisation (``int4s``, group 32); the
query's kept channels are multiplied by the same R, so q·k is unchanged without quantisation
((qR)(kR)^T = q k^T; asserted numerically on every head). Rotations:

* ``H16``: block-diagonal normalised Sylvester Hadamard, blocks of 16 (kept counts are multiples of 16);
* ``H32``: blocks of 32 where the count allows, then one of 16 (48 = 32 + 16), i.e. the blocks are
  the quantisation groups of the row;
* ``rand``: a random orthogonal matrix over the head's whole kept set (QR of a seeded Gaussian).

V is kept unquantised unless the variant says ``V int4s``. Activations are captured once per prompt
and every variant is evaluated on the same tensors.

    python benchmarks/results/quant_error_smollm2/rotation.py \
        | tee benchmarks/results/quant_error_smollm2/rotation_output.txt
"""

import math
import time

import torch
import transformers
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
SAMPLES = 2
captured = {}
start = time.time()


def capture(module, query, key, value, attention_mask, **kw):
    captured[module.layer_idx] = (query[:, :, -QUERIES:].detach(), key.detach(), value.detach(), kw.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


AttentionInterface.register("capture", capture)
model, tok = load_model("smollm2-135m", device="cpu", dtype="float32", attn_implementation="capture")
kept = ChannelMask.load(bundled_mask_path("smollm2-135m", 0.7)).kept  # [L, H, D]
INT4S = KVQuant(4, 32, symmetric=True)
print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")

counts = kept.sum(-1)
print("kept channels per head (counts: heads):",
      {int(c): int(n) for c, n in zip(*torch.unique(counts, return_counts=True), strict=True)})
assert bool((counts % 16 == 0).all()), "a head's kept count is not a multiple of 16"
print("every head's kept count is a multiple of 16")


def per_token(x):  # rows [..., n] -> dequantised, the shipped format
    codes, params = quantize(x, INT4S)
    return dequantize(codes, params, x.shape[-1], INT4S)


def hadamard(n):  # normalised Sylvester Hadamard, n a power of two: entries ±1/sqrt(n)
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def block_hadamard(n, blocks):  # block-diagonal of normalised Hadamards of the given sizes
    assert sum(blocks) == n
    return torch.block_diag(*[hadamard(b) for b in blocks])


def random_orthogonal(n, seed):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix: Haar-distributed


def rotation(kind, layer, h, n):
    if kind == "H16":
        return block_hadamard(n, [16] * (n // 16))
    if kind == "H32":
        return block_hadamard(n, [32] * (n // 32) + [16] * (n % 32 // 16))
    if kind == "rand":
        return random_orthogonal(n, 1000 * layer + h)
    raise ValueError(kind)


ROTS = ("H16", "H32", "rand")
R = {kind: {(layer, h): rotation(kind, layer, h, int(counts[layer, h]))
            for layer in range(kept.shape[0]) for h in range(kept.shape[1]) if counts[layer, h]} for kind in ROTS}
for kind in ROTS:  # orthonormal
    for m in R[kind].values():
        assert torch.allclose(m @ m.T, torch.eye(m.shape[0]), atol=1e-5)


def attend(q, k, v, scaling, layer, k_mid=None, v_mid=None, dense=False, rot=None):
    """Outputs [Hq, Q, D] of the last queries; k_mid/v_mid replace the middle tokens' K/V.

    With ``rot`` ({(layer, h): R}), k_mid[h] holds the middle tokens' kept channels in the rotated
    basis ([M, n]) and the middle scores are (q_kept R) · (k_kept R)^T."""
    Hq, Qn = q.shape[1], q.shape[2]
    H, T = k.shape[1], k.shape[2]
    G = Hq // H
    i = torch.arange(T - Qn, T)[:, None]
    j = torch.arange(T)[None, :]
    full = (j < SINK) | (i - j <= RECENT)
    mid_lo, mid_hi = SINK, T - RECENT - 1  # tokens that left the recent window before the first query
    out = []
    for h in range(H):
        keep = kept[layer, h]
        cols = keep.nonzero().flatten()
        vh = v[0, h].clone()
        if v_mid is not None:
            vh[mid_lo:mid_hi] = v_mid[h]
        if rot is not None and len(cols):
            Rh = rot[(layer, h)]
            kh = k[0, h][:, cols] @ Rh  # [T, n] rotated kept channels
            if k_mid is not None:
                kh[mid_lo:mid_hi] = k_mid[h]
        else:
            Rh = None  # (a head with no kept channels skips the middle: its K does not matter)
            kh = k[0, h].clone()
            if k_mid is not None and rot is None:
                kh[mid_lo:mid_hi] = k_mid[h]
        for g in range(G):
            qq = q[0, h * G + g]
            s_full = qq @ k[0, h].T
            if Rh is not None:
                s_mid = (qq[:, cols] @ Rh) @ kh.T
            else:
                s_mid = (qq * keep) @ (kh * keep).T
            s = s_full if dense else torch.where(full, s_full, s_mid)
            visible = j <= i
            if not dense and not keep.any():
                visible = visible & full
            s = (s * scaling).masked_fill(~visible, float("-inf"))
            p = s.softmax(-1)
            if dense:
                out.append(p @ v[0, h])
            else:  # full positions read the exact V, the others the (maybe quantised) middle store
                pf = p * full
                out.append(pf @ v[0, h] + (p - pf) @ vh)
    return torch.stack(out)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main():
    global worst_score_dev
    names = ["LeanK vs dense", "K int4s, V -",
             *[f"K {r}+int4s, V -" for r in ROTS],
             "K int4s, V int4s (shipped)",
             *[f"K {r}+int4s, V int4s" for r in ROTS]]
    totals = {name: [] for name in names}
    worst_score_dev = 0.0
    for task in TASKS:
        for sample in generate_task(task, tok, LENGTH, SAMPLES, seed=0):
            ids = torch.tensor([encode_prompt(tok, sample.prompt)])
            captured.clear()
            with torch.no_grad():
                model.model(input_ids=ids)
            with torch.no_grad():
                for layer, (q, k, v, scaling) in captured.items():
                    T, H, G = k.shape[2], k.shape[1], q.shape[1] // k.shape[1]
                    lean = attend(q, k, v, scaling, layer)
                    totals["LeanK vs dense"].append(rel(lean, attend(q, k, v, scaling, layer, dense=True)))
                    mid = slice(SINK, T - RECENT - 1)
                    k_mid, v_mid = k[0, :, mid], v[0, :, mid]  # [H, M, D]
                    vm = per_token(v_mid)

                    km = k_mid.clone()  # baseline: the shipped int4s on each head's kept channels
                    for h in range(H):
                        cols = kept[layer, h].nonzero().flatten()
                        if len(cols):
                            km[h][:, cols] = per_token(k_mid[h][:, cols])
                    totals["K int4s, V -"].append(rel(attend(q, k, v, scaling, layer, km), lean))
                    totals["K int4s, V int4s (shipped)"].append(rel(attend(q, k, v, scaling, layer, km, vm), lean))

                    for kind in ROTS:
                        km_rot = {}
                        for h in range(H):
                            cols = kept[layer, h].nonzero().flatten()
                            if not len(cols):
                                continue
                            Rh = R[kind][(layer, h)]
                            # unquantised scores unchanged by the rotation (all positions, every query head)
                            qk, kk = q[0, h * G:(h + 1) * G][..., cols], k[0, h][:, cols]
                            plain, rotated = qk @ kk.T, (qk @ Rh) @ (kk @ Rh).T
                            dev = ((rotated - plain).abs().max() / plain.abs().max()).item()
                            worst_score_dev = max(worst_score_dev, dev)
                            assert dev < 1e-5, (kind, layer, h, dev)
                            km_rot[h] = per_token(k_mid[h][:, cols] @ Rh)
                        rot = R[kind]
                        totals[f"K {kind}+int4s, V -"].append(
                            rel(attend(q, k, v, scaling, layer, km_rot, rot=rot), lean))
                        totals[f"K {kind}+int4s, V int4s"].append(
                            rel(attend(q, k, v, scaling, layer, km_rot, vm, rot=rot), lean))
            print(f"{task} {sample.index} ({time.time() - start:.0f} s)",
                  {n: round(sum(x) / len(x), 4) for n, x in totals.items()}, flush=True)

    print(f"unquantised scores, rotated vs plain: max |diff| / max |score| = {worst_score_dev:.2e} (asserted < 1e-5)")
    print("mean relative error of the attention outputs (over layers, prompts, tasks):")
    for name, values in totals.items():
        print(f"  {name:28s} {sum(values) / len(values):.4f}  (n = {len(values)})")
    best = min(ROTS, key=lambda r: sum(totals[f"K {r}+int4s, V -"]))
    both = sum(totals[f"K {best}+int4s, V int4s"]) / len(totals["K int4s, V -"])
    print(f"best rotation on K alone: {best}; with V int4s: {both:.4f}")
    print(f"runtime {time.time() - start:.0f} s")


if __name__ == "__main__":  # (row_groups.py imports the setup above without running this)
    main()
