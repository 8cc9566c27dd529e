"""Where a compiled LeanK decode step spends its GPU time: torch.profiler over a few steps of
the Llama-3.1-8B shape (random weights, the authors' mask), kernels sorted by GPU time.

    python benchmarks/profile_step.py --length 32768 --batch 8 [--fuse]
"""

from __future__ import annotations

import argparse

import torch

from leank import bench
from leank.cache import cache_kwargs
from leank.fuse import fuse_projections
from leank.measure import make_cache, repeat_rows


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fuse", action="store_true", help="leank.fuse_projections(model) first")
    args = parser.parse_args()
    model, mask = bench.load(bench.LLAMA_8B_SHAPE, None, torch.device("cuda"))
    if args.fuse:
        fuse_projections(model)
    cache = make_cache("leank", model, mask, args.length + 32)
    ids = torch.randint(10, 1000, (1, args.length), device="cuda")
    token = model(input_ids=ids, logits_to_keep=1, **cache_kwargs(cache)).logits[:, -1].argmax(-1, keepdim=True)
    repeat_rows(cache, args.batch)
    token = token.repeat_interleave(args.batch, 0)
    forward = bench.decode_forward(model, "leank")
    for _ in range(5):
        torch.compiler.cudagraph_mark_step_begin()
        token = forward(input_ids=token, logits_to_keep=1, **cache_kwargs(cache)).logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            torch.compiler.cudagraph_mark_step_begin()
            token = forward(input_ids=token, logits_to_keep=1, **cache_kwargs(cache)).logits[:, -1].argmax(-1,
                                                                                                         keepdim=True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))


if __name__ == "__main__":
    main()
