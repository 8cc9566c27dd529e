"""KV-cache bytes of LeanK vs the dense cache on the real SmolLM2-135M.

Prefills a prose prompt of each length, decodes a few tokens, and reports bytes actually
allocated (all buffers and index tensors), the ideal figure for the mask, the documented
overhead, and the saving against transformers' DynamicCache. Prints a table, writes JSON.

    python benchmarks/kv_bytes.py --lengths 2048 4096 --out benchmarks/results/kv_bytes_smollm2.json
    python benchmarks/kv_bytes.py --lengths 8192 --dtype bfloat16 --quant \
        --out benchmarks/results/kv_bytes_quant_smollm2.json   # + the learned 70% mask quantised
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402

import leank  # noqa: E402
from leank._io import atomic_write_json  # noqa: E402
from leank.cache import dense_cache_nbytes  # noqa: E402
from leank.data.text import bundled_prose  # noqa: E402
from leank.masks import ChannelMask, authors_like_mask  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--decode", type=int, default=8, help="tokens decoded after the prompt")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="model dtype (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--quant", action="store_true",
                        help="also the learned 70%% mask with an int8, int4 (group 32) and int4 (group 64) "
                             "middle store")
    parser.add_argument("--out", default="benchmarks/results/kv_bytes_smollm2.json")
    args = parser.parse_args()

    model, tok = leank.load_model("smollm2-135m", device=args.device, dtype=args.dtype)
    prose = tok(bundled_prose(), return_tensors="pt", add_special_tokens=False).input_ids
    masks = {
        "learned 70%": ChannelMask.load(leank.bundled_mask_path("smollm2-135m", 0.7)),
        "learned 80%": ChannelMask.load(leank.bundled_mask_path("smollm2-135m", 0.8)),
        "magnitude 70%": ChannelMask.load(leank.bundled_mask_path("smollm2-135m", method="magnitude")),
        "authors-like 70%": authors_like_mask(torch.rand(30, 3, 64, generator=torch.Generator().manual_seed(0))),
    }
    variants = {name: (mask, None) for name, mask in masks.items()}
    if args.quant:
        for quant in (leank.KVQuant(8), leank.KVQuant(4), leank.KVQuant(4, 64), leank.KVQuant(4, symmetric=True),
                      leank.KVQuant(4, 64, symmetric=True)):
            sym = " symmetric" if quant.symmetric else ""
            variants[f"learned 70% + int{quant.bits} g{quant.group}{sym}"] = (masks["learned 70%"], quant)
    rows = []
    for length in args.lengths:
        ids = prose[:, :length].to(model.device)
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.decode,
                  min_new_tokens=args.decode, do_sample=False, pad_token_id=tok.pad_token_id)
        dense = DynamicCache(config=model.config)  # plain K/V: the "leank" attention runs SDPA on them
        with torch.inference_mode():
            model.generate(**kw, **leank.cache_kwargs(dense))
        dense_bytes = dense_cache_nbytes(dense)
        for name, (mask, quant) in variants.items():
            cache = leank.LeanKCache(model, mask, max_length=length + args.decode, quant=quant)
            with torch.inference_mode():
                model.generate(**kw, **leank.cache_kwargs(cache))
            measured, ideal = cache.nbytes(), cache.ideal_nbytes()
            rows.append({
                "length": length, "tokens_cached": int(cache.get_seq_length()), "mask": name,
                "mask_sparsity": round(mask.sparsity, 4), "fully_pruned_heads": mask.fully_pruned_heads,
                "sink": cache.sink, "recent": cache.recent,
                "dense_bytes": dense_bytes, "leank_bytes": measured, "ideal_bytes": ideal,
                "overhead_bytes": cache.overhead_nbytes(),
                "saving": round(1 - measured / dense_bytes, 4), "ideal_saving": round(1 - ideal / dense_bytes, 4),
                "dtype": str(model.dtype),
            })
    print(f"{'length':>6} {'mask':<24} {'dense MiB':>10} {'LeanK MiB':>10} {'ideal MiB':>10} {'saving':>7}")
    for r in rows:
        print(f"{r['length']:>6} {r['mask']:<24} {r['dense_bytes'] / 2**20:>10.2f} {r['leank_bytes'] / 2**20:>10.2f} "
              f"{r['ideal_bytes'] / 2**20:>10.2f} {r['saving']:>7.1%}")
    atomic_write_json(args.out, {"environment": environment(), "rows": rows})
    print(json.dumps({"out": args.out, "rows": len(rows)}))


if __name__ == "__main__":
    main()
