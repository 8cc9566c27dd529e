"""generate() on a GPU with the real SmolLM2-135M: the compiled path against the eager one.

For fp32 and bf16, greedy decoding of a long prose prompt:

* LeanK (the bundled learned 70% mask), ``generate()``'s own compiled path (the cache is
  static, so transformers compiles the decode step: CUDA graphs, the Triton kernel) against
  the same cache eager (``disable_compile=True``, the Triton kernel);
* LeanK with an all-kept mask, compiled, against the dense ``DynamicCache`` + SDPA, eager.

The prompt is long enough, and enough tokens are generated, for many tokens to move through
the ring into the middle store. Records whether the tokens are identical, the first
difference, how many graphs dynamo compiled, and each generate()'s wall time.

``--fuse``: the model's projections fused (:func:`leank.fuse_projections`, as ``leank bench``'s
``*-fused`` methods run it) for every generate() above: compiled against eager, both fused.

    python benchmarks/generate_check.py --length 6000 --new 256 --out benchmarks/results/generate_check.json
    python benchmarks/generate_check.py --fuse --out benchmarks/results/generate_check_fused.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402

import leank  # noqa: E402
from leank._io import atomic_write_json  # noqa: E402
from leank.data.text import bundled_prose  # noqa: E402
from leank.resources import bundled_mask_path  # noqa: E402


def generate(model, ids, cache, new: int, pad: int, **kw) -> tuple[list[int], float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad,
                         **kw, **leank.cache_kwargs(cache))
    torch.cuda.synchronize()
    return out[0, ids.shape[1]:].tolist(), time.perf_counter() - start


def compare(a: list[int], b: list[int]) -> dict:
    same = [x == y for x, y in zip(a, b, strict=True)]
    return {"identical": all(same), "first_difference": same.index(False) if False in same else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=6000)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/generate_check.json")
    parser.add_argument("--fuse", action="store_true", help="fuse the model's q/k/v and gate/up projections")
    args = parser.parse_args()
    learned = leank.ChannelMask.load(bundled_mask_path("smollm2-135m", 0.7))
    results = {"prompt_tokens": args.length, "new_tokens": args.new, "mask": "bundled learned 70%",
               "fused_projections": args.fuse}
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = leank.load_model("smollm2-135m", dtype=dtype, device="cuda")
        if args.fuse:
            assert leank.fuse_projections(model) == 2 * model.config.num_hidden_layers
        ids = tok(bundled_prose(), return_tensors="pt", add_special_tokens=False).input_ids[:, : args.length].cuda()
        cfg = model.config
        all_kept = leank.ChannelMask.full(cfg.num_hidden_layers, cfg.num_key_value_heads, learned.head_dim,
                                          sink=learned.sink, recent=learned.recent)
        max_length = ids.shape[1] + args.new
        pad = tok.pad_token_id
        row = {}
        torch._dynamo.reset()
        counters.clear()
        eager, row["leank_eager_s"] = generate(model, ids, leank.LeanKCache(model, learned, max_length=max_length),
                                               args.new, pad, disable_compile=True)
        compiled, row["leank_compiled_s"] = generate(
            model, ids, leank.LeanKCache(model, learned, max_length=max_length), args.new, pad)
        row["graphs_compiled"] = counters["stats"]["unique_graphs"]
        compiled2, row["leank_compiled_second_call_s"] = generate(
            model, ids, leank.LeanKCache(model, learned, max_length=max_length), args.new, pad)
        row["leank_compiled_vs_eager"] = compare(compiled, eager)
        row["leank_compiled_repeatable"] = compiled == compiled2
        kept, row["all_kept_compiled_s"] = generate(
            model, ids, leank.LeanKCache(model, all_kept, max_length=max_length), args.new, pad)
        model.set_attn_implementation("sdpa")
        dense, row["dense_eager_s"] = generate(model, ids, DynamicCache(), args.new, pad)
        row["all_kept_compiled_vs_dense"] = compare(kept, dense)
        row["tokens_leank_compiled"], row["tokens_leank_eager"] = compiled, eager
        results[str(dtype)] = row
        print(dtype, {k: v for k, v in row.items() if not k.startswith("tokens")}, flush=True)
        del model
        torch.cuda.empty_cache()
    atomic_write_json(Path(args.out), {"environment": environment(), **results})


if __name__ == "__main__":
    main()
