"""generate() on a GPU: the Triton kernel (the default there) vs the torch backend, SmolLM2.

Greedy decoding of a long prose prompt with the bundled learned 70% mask; counts the
kernel's calls to show generate() used it by default, and compares the tokens.

    python benchmarks/generate_check.py --length 6000 --new 64 --out benchmarks/results/generate_check.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402

import leank  # noqa: E402
from leank import kernels  # noqa: E402
from leank._io import atomic_write_json  # noqa: E402
from leank.data.text import bundled_prose  # noqa: E402
from leank.resources import bundled_mask_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=6000)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/generate_check.json")
    args = parser.parse_args()
    calls = {"triton": 0}
    triton_fn = kernels.BACKENDS["triton"]

    def counted(*a, **kw):
        calls["triton"] += 1
        return triton_fn(*a, **kw)

    kernels.BACKENDS["triton"] = counted
    mask = leank.ChannelMask.load(bundled_mask_path("smollm2-135m", 0.7))
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tok = leank.load_model("smollm2-135m", dtype=dtype, device="cuda")
        ids = tok(bundled_prose(), return_tensors="pt", add_special_tokens=False).input_ids[:, : args.length].cuda()
        tokens = {}
        for backend in ("auto", "torch"):
            os.environ["LEANK_ATTENTION_BACKEND"] = backend
            calls["triton"] = 0
            cache = leank.LeanKCache(model, mask, max_length=args.length + args.new)
            out = model.generate(input_ids=ids, max_new_tokens=args.new, do_sample=False, min_new_tokens=args.new,
                                 pad_token_id=tok.pad_token_id, **leank.cache_kwargs(cache))
            tokens[backend] = out[0, ids.shape[1]:].tolist()
            results[f"{dtype}/{backend}/triton_calls"] = calls["triton"]
        os.environ.pop("LEANK_ATTENTION_BACKEND", None)
        same = [a == b for a, b in zip(tokens["auto"], tokens["torch"], strict=True)]
        first_diff = same.index(False) if False in same else None
        results[str(dtype)] = {"prompt_tokens": ids.shape[1], "new_tokens": args.new, "identical": all(same),
                               "first_difference": first_diff, "tokens_auto": tokens["auto"],
                               "tokens_torch": tokens["torch"]}
        print(dtype, "identical" if all(same) else f"first difference at token {first_diff}",
              "| triton calls (auto):", results[f"{dtype}/auto/triton_calls"],
              "(torch):", results[f"{dtype}/torch/triton_calls"])
    atomic_write_json(Path(args.out), {"environment": environment(), **results})


if __name__ == "__main__":
    main()
