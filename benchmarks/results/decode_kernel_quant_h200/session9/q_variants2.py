# ruff: noqa
"""Next session: int4s kernel loop variants side by side (Llama-3.1-8B shape, the authors' mask, bf16).
Variants are whole copies of leank/kernels/triton_decode.py swapped in and reloaded:
  committed  -- the committed loop (next block's bytes prefetched into registers)
  range3     -- `for start in tl.range(lo, hi, BLOCK, num_stages=3)`, loads inside (Triton's pipeliner
                then stages the uint8 code loads into shared memory with cp.async, 2 blocks ahead)
  range4     -- the same with num_stages=4 (193 registers)
Run from the repo root: PYTHONPATH=$PWD python .scratch/q_variants2.py  (writes $OUT/q_variants2.json)."""
import importlib, json, os, shutil, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks")
import decode_kernel as dk
import leank.kernels.triton_decode as td
from leank.quant import parse_quant

KERNEL = Path("leank/kernels/triton_decode.py")
shutil.copy(KERNEL, "/tmp/td_committed.py")
VARIANTS = {"committed": "/tmp/td_committed.py", "range3": ".scratch/td_range3.py", "range4": ".scratch/td_range4.py"}
mask = dk.model_mask("llama3.1-8b")
L, Hq, H, D = mask.num_layers, 32, 8, 128
dev = torch.device("cuda")
res = {"copy_tbs": dk.copy_bandwidth(dev), "env": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()},
       "shapes": {}, "variants": []}
quant = parse_quant("int4s")
shapes = {}
for B, T in ((8, 32768), (1, 131072)):
    torch.manual_seed(0)
    k = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
    flash = dk.bench(dk.dense_fns(q, k, v, D ** -0.5)["sdpa-flash"]) * L
    layers = [dk.build_layer(mask.kept[i], k, v, mask.sink, mask.recent, quant) for i in range(L)]
    shapes[f"{B}x{T}"] = (q, layers)
    res["shapes"][f"{B}x{T}"] = {"flash_ms": flash, "int4s_bytes": sum(dk.leank_read_bytes(x) for x in layers)}
    del k, v
    torch.cuda.empty_cache()
print(json.dumps(res), flush=True)
try:
    for name, path in VARIANTS.items():
        shutil.copy(path, KERNEL)
        importlib.reload(td)
        for shape, (q, layers) in shapes.items():
            for cfg in ((64, 4, 2, 4), (128, 4, 2, 4)):
                t0 = time.time()
                try:
                    ms = dk.run_leank(layers, q, D ** -0.5, cfg)
                except Exception as e:  # noqa: BLE001
                    ms = None
                    print("failed", name, shape, cfg, type(e).__name__, str(e)[:200], flush=True)
                s = res["shapes"][shape]
                row = {"variant": name, "shape": shape, "config": cfg, "ms": ms,
                       "tbs_over_copy": ms and s["int4s_bytes"] / ms / 1e9 / res["copy_tbs"],
                       "vs_flash": ms and s["flash_ms"] / ms, "wall_s": round(time.time() - t0, 1)}
                res["variants"].append(row)
                print(json.dumps(row), flush=True)
                Path(os.environ["OUT"], "q_variants2.json").write_text(json.dumps(res, indent=1))
finally:
    shutil.copy("/tmp/td_committed.py", KERNEL)
