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

    if (args.mask is None) == (args.model is None):
        raise LeanKError("pass a mask file or --model MODEL (the bundled mask picked for that model): "
                         + ("not both" if args.mask is not None else "neither was given"))
    if args.model is not None:
        from .resources import bundled_mask_path

        args.mask = str(bundled_mask_path(args.model))
        if not args.json:
            print(f"bundled mask for {args.model}:")
    mask = ChannelMask.load(args.mask)
    s = mask.summary()
    # Metadata the file lacks (the authors' masks have none) is shown as the library default, marked so.
    missing = sorted(set(FILE_METADATA) - set(_file_metadata(args.mask)))
    if args.json:
        if missing:
            s["defaults_not_in_file"] = missing
        print(json.dumps(s, indent=2))
        return 0
    print(f"{args.mask}")
    for key in ("model", "method", "shape", "alignment", "sink", "recent"):
        note = "" if key not in missing else " (not in the file)" if key in ("model", "method") else \
            " (not in the file: library default)"
        print(f"  {key:<28} {s[key]}{note}")
    if mask.layers is not None:
        print(f"  {'compressed model layers':<28} {list(mask.layers)} (the others are not compressed)")
    print(f"  {'K channels pruned':<28} {mask.sparsity:.2%}")
    print(f"  {'KV heads fully pruned':<28} {mask.fully_pruned_heads}/{s['total_heads']}")
    print(f"  {'heads by kept count':<28} {s['heads_by_kept_count']}")
    print(f"  {'middle-token KV bytes kept':<28} {mask.kv_bytes_fraction:.2%}")
    return 0


FILE_METADATA = ("model", "method", "alignment", "sink", "recent")


def _file_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: v for k, v in meta.items() if k in FILE_METADATA and v != ""}


def _calibrate(args) -> int:
    from ._io import check_writable_file
    from .masks import check_sparsity

    # Everything that can be checked without the model is checked before it loads.
    check_sparsity(args.sparsity)
    for name in ("samples", "length", "align"):
        if getattr(args, name) < 1:
            raise LeanKError(f"--{name} must be at least 1, got {getattr(args, name)}")
    check_writable_file(args.out)

    import torch

    from .calibrate import magnitude_mask
    from .data.text import bundled_prose, load_corpus
    from .masks import check_alignment, kv_shape
    from .models import check_device, check_length, load_model

    check_device(args.device)
    text = load_corpus(args.corpus) if args.corpus else bundled_prose()
    model, tokenizer = load_model(args.model, device=args.device)
    check_alignment(args.align, kv_shape(model.config)[2])
    check_length(model, args.length)
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
          f"{mask.fully_pruned_heads} heads fully pruned"
          + (f" (calibrated on {n} of the {args.samples} samples asked: the corpus is shorter)"
             if n < args.samples else ""))
    return 0


def _demo(args) -> int:
    from .demo import main

    return main(args)


# Subcommands defined elsewhere: the module (relative to leank) whose ``register(subparsers)``
# adds them, and the one-line help shown by `leank --help`, which must not import those modules (torch, transformers).
LAZY_COMMANDS = {
    "train": (".train.cli",
              "learn LeanK masks (two-stage distillation, GPU; several with torchrun)"),
    "eval": (".eval.cli", "RULER-style tasks (and decode agreement) for several methods"),
    "report": (".eval.cli", "markdown tables and plots of a `leank eval` results directory"),
    "analyze": (".analysis",
                "importance analysis of a mask or stage-1 α: figures and numbers"),
    "bench": (".bench", "end-to-end decoding benchmark on a GPU: full cache vs LeanK"),
}
ALL = "*"


def build_parser(command: str | None = ALL) -> argparse.ArgumentParser:
    """The ``leank`` parser; ``command``: build only that subcommand's full parser (None: none)."""
    parser = argparse.ArgumentParser(prog="leank", description="LeanK: learned K-cache channel pruning")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="needle-in-a-haystack with the full and the LeanK cache (CPU)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--mask", default=None, help="mask file (default: the bundled mask of the model)")
    p.add_argument("--length", type=int, default=2048, help="prompt tokens (default 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_demo)

    p = sub.add_parser("info", help="statistics of a mask file (or of the bundled mask for --model)")
    p.add_argument("mask", nargs="?")
    p.add_argument("--model", default=None,
                   help="alias, hub id, or model directory: show the bundled mask LeanK picks for it")
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

    _add_commands(sub, command)
    return parser


def _add_commands(sub, command: str | None) -> None:
    """Register the module of ``command`` (every module for ``ALL``); the other lazy commands get
    a placeholder parser with their help line, so ``leank --help`` imports nothing heavy."""
    import importlib

    for module in dict.fromkeys(m for name, (m, _) in LAZY_COMMANDS.items() if command in (ALL, name)):
        importlib.import_module(module, __package__).register(sub)
    for name, (_, help_text) in LAZY_COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text)


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first non-option word), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_of(argv)).parse_args(argv)
    args.argv = argv  # what was asked for, recorded with results
    try:
        return args.run(args)
    except LeanKError as e:
        print(f"leank {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write or read the code did not anticipate: still one line, naming the path
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"leank {args.command}: error:{where} {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
