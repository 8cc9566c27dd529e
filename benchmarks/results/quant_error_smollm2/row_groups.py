"""One int4 scale per row (K: the head's kept channels; V: head_dim) instead of groups of 32, with and without
rotating the row first (issue 14, a CPU proxy).

Why: a kernel can dequantise in the tensor cores' register layout only if each scale broadcasts along a whole
row of the tile (Triton then moves the code *bytes* through shared memory, not the dequantised values:
docs/LOG.md, tenth session); groups inside a row need a reshape that forces the dequantised tile through
shared memory. So: how much accuracy does a per-row scale cost, and does a rotation (which spreads a row's
outliers over its channels) win it back?

The proxy of ``rotation.py`` (same model, bundled 70% mask, sink 32 / recent 64, prompts, tasks, metric: the
relative error of the last 48 prompt positions' attention outputs in all 30 layers against LeanK without
quantisation). Symmetric int4 per token everywhere. Rotations: K's kept channels by the block Hadamard of
``int4sr`` (blocks of 32 then 16), and for the per-row variants by one Hadamard over the row where its width
is a power of two (else the same blocks); V by a 64 × 64 Hadamard (head_dim 64), undone on the dequantised
values (the output is linear in V, so undoing it before or after P is the same).
Caveat: SmolLM2's heads are 64 wide and keep 16–48 K channels, so "groups of 32" are 1–2 per row here; at
Llama's 128 they are 4 per V row.

    cd benchmarks/results/quant_error_smollm2 && python row_groups.py | tee row_groups_output.txt
"""

import time

import rotation as base  # the proxy's model, prompts, capture and attention (its setup runs on import)
import torch

from leank.quant import KVQuant, dequantize, quantize

start = time.time()


def int4(x, group):
    """Rows [..., n] -> dequantised, symmetric int4 per token, ``group`` values per scale, as
    leank.quant's symmetric format computes it (scale amax / 7, code floor(x / s + 1/2) + 8 in [0, 15]) but
    for any group (KVQuant allows powers of two only; a row of 48 kept channels is one group of 48 here)."""
    n = x.shape[-1]
    pad = -n % group  # a last, shorter group (zeros do not change its amax), as KVQuant pads it
    g = torch.nn.functional.pad(x, (0, pad)).unflatten(-1, ((n + pad) // group, group))
    s = g.abs().amax(-1, keepdim=True) / 7
    codes = (torch.floor(g / torch.where(s > 0, s, 1.0) + 0.5) + 8).clamp(0, 15)
    return ((codes - 8) * s).flatten(-2)[..., :n]


_q = KVQuant(4, 32, symmetric=True)
for _n in (16, 48, 64):  # the shipped format, bit for bit (rows shorter than a group, a shorter last group)
    _check = torch.randn(5, _n, generator=torch.Generator().manual_seed(_n))
    assert torch.equal(int4(_check, 32), dequantize(*quantize(_check, _q), _n, _q)), _n


def row_hadamard(n):
    return base.hadamard(n) if n & (n - 1) == 0 else base.rotation("H32", 0, 0, n)


VARIANTS = ("g32", "g32 rotK", "row", "row rotK", "row rotK rotV", "g32 rotK rotV")
totals = {name: [] for name in VARIANTS}
for task in base.TASKS:
    for sample in base.generate_task(task, base.tok, base.LENGTH, base.SAMPLES, seed=0):
        ids = torch.tensor([base.encode_prompt(base.tok, sample.prompt)])
        base.captured.clear()
        with torch.no_grad():
            base.model.model(input_ids=ids)
            for layer, (q, k, v, scaling) in base.captured.items():
                T, H, D = k.shape[2], k.shape[1], k.shape[3]
                lean = base.attend(q, k, v, scaling, layer)
                mid = slice(base.SINK, T - base.RECENT - 1)
                k_mid, v_mid = k[0, :, mid], v[0, :, mid]
                hv = base.hadamard(D)
                for name in VARIANTS:
                    row = name.startswith("row")
                    vg = D if row else 32
                    vm = int4(v_mid @ hv, vg) @ hv.T if "rotV" in name else int4(v_mid, vg)
                    km, rot = {}, {}
                    for h in range(H):
                        cols = base.kept[layer, h].nonzero().flatten()
                        if not len(cols):
                            continue
                        n = len(cols)
                        if "rotK" in name:
                            rot[(layer, h)] = row_hadamard(n) if row else base.R["H32"][(layer, h)]
                            km[h] = int4(k_mid[h][:, cols] @ rot[(layer, h)], n if row else 32)
                        else:
                            rot[(layer, h)] = torch.eye(n)
                            km[h] = int4(k_mid[h][:, cols], n if row else 32)
                    out = base.attend(q, k, v, scaling, layer, km, vm, rot=rot)
                    totals[name].append(base.rel(out, lean))
        print(f"{task} {sample.index} ({time.time() - start:.0f} s)",
              {n: round(sum(x) / len(x), 4) for n, x in totals.items()}, flush=True)

print("mean relative error of the attention outputs, K and V int4 (over layers, prompts, tasks):")
for name, values in totals.items():
    print(f"  {name:16s} {sum(values) / len(values):.4f}  (n = {len(values)})")
