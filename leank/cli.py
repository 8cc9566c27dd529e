"""The ``leank`` command line: ``demo``, ``info``, ``calibrate``, ``train``,
``eval``, ``report``, ``analyze``.

    leank demo
    leank info MASK.safetensors
    leank calibrate --model smollm2-135m --sparsity 0.7 --align 16 --out mask.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import LeanKError


def _info(args) -> int:
    from .masks import ChannelMask

    mask = ChannelMask.load(args.mask)
    s = mask.summary()
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{args.mask}")
    for key in ("model", "method", "shape", "alignment", "sink", "recent"):
        print(f"  {key:<28} {s[key]}")
    print(f"  {'K channels pruned':<28} {mask.sparsity:.2%}")
    print(f"  {'KV heads fully pruned':<28} {mask.fully_pruned_heads}/{s['total_heads']}")
    print(f"  {'heads by kept count':<28} {s['heads_by_kept_count']}")
    print(f"  {'middle-token KV bytes kept':<28} {mask.kv_bytes_fraction:.2%}")
    return 0


def _calibrate(args) -> int:
    import torch

    from .calibrate import magnitude_mask
    from .data.text import bundled_prose, load_corpus
    from .models import load_model

    model, tokenizer = load_model(args.model, device=args.device)
    text = load_corpus(args.corpus) if args.corpus else bundled_prose()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < args.length:
        raise LeanKError(f"the corpus has {ids.numel()} tokens, fewer than --length {args.length}: use a longer one")
    n = min(args.samples, ids.numel() // args.length)
    batches = [ids[i * args.length : (i + 1) * args.length][None] for i in range(n)]
    mask = magnitude_mask(
        model, batches, sparsity=args.sparsity, alignment=args.align, per_head=args.per_head,
        model_name=args.model, info={"calibration_tokens": n * args.length, "corpus": args.corpus or "bundled prose",
                                "torch": torch.__version__},
    )
    mask.save(args.out)
    print(f"wrote {args.out}: {mask.method}, sparsity {mask.sparsity:.2%}, "
          f"{mask.fully_pruned_heads} heads fully pruned")
    return 0


def _demo(args) -> int:
    from .demo import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leank", description="LeanK: learned K-cache channel pruning")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="needle-in-a-haystack with the full and the LeanK cache (CPU)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--mask", default=None, help="mask file (default: the bundled mask of the model)")
    p.add_argument("--length", type=int, default=2048, help="prompt tokens (default 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_demo)

    p = sub.add_parser("info", help="statistics of a mask file")
    p.add_argument("mask")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_info)

    p = sub.add_parser("calibrate", help="a static magnitude mask from activations (the baseline)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument("--align", type=int, default=16)
    p.add_argument("--per-head", action="store_true", help="same kept count in every head")
    p.add_argument("--corpus", default=None, help="text file or directory (default: bundled prose)")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(run=_calibrate)

    from .analysis import register as register_analyze
    from .bench import register as register_bench
    from .eval.cli import register as register_eval
    from .train.cli import register as register_train

    register_train(sub)
    register_eval(sub)
    register_analyze(sub)
    register_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except LeanKError as e:
        print(f"leank {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
