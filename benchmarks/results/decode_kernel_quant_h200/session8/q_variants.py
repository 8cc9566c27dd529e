# ruff: noqa  (the script as it ran on the GPU, kept unchanged)
"""int4s decode kernel variants side by side (8 x 32K, Llama-3.1-8B shape, the authors' mask, bf16):
prefetch on/off x (block, warps, stages, waves), with Flash SDPA and the plain LeanK kernel in the same run."""
import json, os, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks")
import decode_kernel as dk
from leank.kernels import triton_decode as td
from leank.quant import parse_quant

B, T = 8, 32768
Hq, H, D = 32, 8, 128
mask = dk.model_mask("llama3.1-8b")
dev = torch.device("cuda")
torch.manual_seed(0)
k = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
v = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
scaling = D ** -0.5
res = {"copy_tbs": dk.copy_bandwidth(dev)}
L = mask.num_layers
res["flash_ms"] = dk.bench(dk.dense_fns(q, k, v, scaling)["sdpa-flash"]) * L
plain = [dk.build_layer(mask.kept[i], k, v, mask.sink, mask.recent) for i in range(L)]
res["plain_ms"] = dk.run_leank(plain, q, scaling)
del plain
quant = parse_quant("int4s")
layers = [dk.build_layer(mask.kept[i], k, v, mask.sink, mask.recent, quant) for i in range(L)]
res["int4s_bytes"] = sum(dk.leank_read_bytes(x) for x in layers)
del k, v
torch.cuda.empty_cache()
print(json.dumps(res), flush=True)
variants = []
res["env"] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
res["variants"] = variants
for pf, cfgs in ((True, ((64, 4, 2, 4), (128, 8, 2, 4), (128, 4, 2, 4))), (False, ((64, 4, 2, 4), (128, 8, 2, 4)))):
    for cfg in cfgs:
        td.INT4_PREFETCH = pf
        t0 = time.time()
        try:
            ms = dk.run_leank(layers, q, scaling, cfg)
        except Exception as e:  # noqa: BLE001
            ms = None
            print("failed", pf, cfg, type(e).__name__, str(e)[:200], flush=True)
        row = {"prefetch": pf, "config": cfg, "ms": ms,
               "tbs_over_copy": ms and res["int4s_bytes"] / ms / 1e9 / res["copy_tbs"],
               "vs_flash": ms and res["flash_ms"] / ms, "wall_s": round(time.time() - t0, 1)}
        variants.append(row)
        print(json.dumps(row), flush=True)
        Path(os.environ["OUT"], "q_variants.json").write_text(json.dumps(res, indent=1))
