# ruff: noqa
"""Next session: int4s/int8 kernel waves side by side (the ncu reading: int4 runs 3 blocks/SM, so 4 waves
= 1.33 rounds of programs and the SMs idle 21% of the time). Llama-3.1-8B shape, authors' mask, bf16.
Run from the repo root: PYTHONPATH=$PWD python .scratch/q_waves.py  (writes $OUT/q_waves.json)."""
import json, os, time
from pathlib import Path
import sys
import torch
sys.path.insert(0, "benchmarks")
import decode_kernel as dk
from leank.quant import parse_quant

mask = dk.model_mask("llama3.1-8b")
L, Hq, H, D = mask.num_layers, 32, 8, 128
dev = torch.device("cuda")
res = {"copy_tbs": dk.copy_bandwidth(dev), "env": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()},
       "rows": []}
for B, T in ((8, 32768), (1, 131072)):
    torch.manual_seed(0)
    k = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
    flash = dk.bench(dk.dense_fns(q, k, v, D ** -0.5)["sdpa-flash"]) * L
    for fmt in ("int4s", "int8", None):
        quant = parse_quant(fmt) if fmt else None
        layers = [dk.build_layer(mask.kept[i], k, v, mask.sink, mask.recent, quant) for i in range(L)]
        nbytes = sum(dk.leank_read_bytes(x) for x in layers)
        for cfg in ((64, 4, 2, 3), (64, 4, 2, 4), (64, 4, 2, 6), (64, 4, 2, 8), (128, 4, 2, 3), (128, 4, 2, 6)):
            t0 = time.time()
            try:
                ms = dk.run_leank(layers, q, D ** -0.5, cfg)
            except Exception as e:  # noqa: BLE001
                ms = None
                print("failed", fmt, cfg, type(e).__name__, str(e)[:200], flush=True)
            row = {"format": fmt or "bf16", "shape": f"{B}x{T}", "config": cfg, "ms": ms, "flash_ms": flash,
                   "vs_flash": ms and flash / ms, "tbs_over_copy": ms and nbytes / ms / 1e9 / res["copy_tbs"],
                   "wall_s": round(time.time() - t0, 1)}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            Path(os.environ["OUT"], "q_waves.json").write_text(json.dumps(res, indent=1))
        del layers
        torch.cuda.empty_cache()
    del k, v
    torch.cuda.empty_cache()
