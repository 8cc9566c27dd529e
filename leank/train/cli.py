"""``leank train``: the command-line front of :func:`leank.train.train`."""

from __future__ import annotations

import json
import os

from .._defaults import DEFAULT_RECENT, DEFAULT_SINK
from .config import STAGE2_KEEP


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="learn LeanK masks (two-stage distillation, GPU; several with torchrun)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.7], help="target sparsities (one stage 2 each)")
    p.add_argument("--align", type=int, default=16, help="per-head kept counts are multiples of this")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--steps1", type=int, default=800, help="stage-1 steps (paper: 2000)")
    p.add_argument("--steps2", type=int, default=150, help="stage-2 steps per sparsity (paper: 200)")
    p.add_argument("--lr1", type=float, default=0.02)
    p.add_argument("--lr2", type=float, default=0.01)
    p.add_argument("--reg", type=float, default=0.06,
                   help="λ of the L1 penalty in stage 1. For 85-90%% targets, 0.12 with --steps1 2000 --steps2 200 "
                        "--align 8 gave the best SmolLM2 masks there "
                        "(benchmarks/results/train_smollm2_lam12)")
    p.add_argument("--min-length", type=int, default=4096)
    p.add_argument("--max-length", type=int, default=8192)
    p.add_argument("--sink", type=int, default=DEFAULT_SINK)
    p.add_argument("--recent", type=int, default=DEFAULT_RECENT)
    p.add_argument("--batch", type=int, default=1, help="samples per optimiser step")
    p.add_argument("--corpus", default=None, help="text file or directory replacing the bundled prose")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workers", type=int, default=2, help="data-generation worker processes")
    p.add_argument("--validation-samples", type=int, default=16, help="held-out samples for validation losses")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the frozen model (FSDP2 fully_shard)")
    _on_off_auto(p, "cuda-graphs",
                 "replay each sample's decode-region passes as CUDA graphs, one per padded shape (the same objective "
                 "up to rounding; one GPU, no torchrun). Default: auto — on for models under 1B parameters, whose "
                 "steps the host bounds, except those with sliding-window layers, length-dependent RoPE or experts",
                 "run every pass eagerly")
    _on_off_auto(p, "recompute",
                 "recompute each layer's attention in the backward pass (same result; less memory, more time). "
                 "Default: auto — off when the memory check's longest sample peaks below 80%% of the GPU, on "
                 "otherwise (and under --fsdp)",
                 "keep every layer's attention activations for the backward pass")
    p.add_argument("--stage1-alpha", default=None, metavar="PATH",
                   help="alpha.safetensors of an earlier run's finished stage 1 (same model): skip stage 1 and "
                        "run stage 2 for each --sparsity from it")
    p.add_argument("--stage2-keep", choices=STAGE2_KEEP, default="last",
                   help="last (default, the paper's recipe): each mask from stage 2's α; best: from stage 1's α "
                        "binarised instead when stage 2 raised the binarised mask's held-out distillation loss "
                        "(summary.json gives both losses and sparsities and which was kept; the two masks can "
                        "differ in achieved sparsity by a percent or so)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(run=_run)


def _on_off_auto(parser, name: str, on_help: str, off_help: str) -> None:
    """``--NAME`` / ``--no-NAME``, stored as True / False; neither: None (the trainer decides)."""
    group, dest = parser.add_mutually_exclusive_group(), name.replace("-", "_")
    group.add_argument(f"--{name}", dest=dest, action="store_const", const=True, default=None, help=on_help)
    group.add_argument(f"--no-{name}", dest=dest, action="store_const", const=False, help=off_help)


def _run(args) -> int:
    from .config import TrainConfig
    from .trainer import train

    cfg = TrainConfig(
        model=args.model, out=args.out, sparsities=tuple(args.sparsity), alignment=args.align, sink=args.sink,
        recent=args.recent, min_length=args.min_length, max_length=args.max_length, stage1_steps=args.steps1,
        stage2_steps=args.steps2, lr1=args.lr1, lr2=args.lr2, reg=args.reg, batch=args.batch, corpus=args.corpus,
        seed=args.seed, checkpoint_every=args.checkpoint_every, device=args.device, dtype=args.dtype,
        workers=args.workers, validation_samples=args.validation_samples, fsdp=args.fsdp,
        recompute=args.recompute, cuda_graphs=args.cuda_graphs,
        stage1_alpha=args.stage1_alpha, stage2_keep=args.stage2_keep,
    )
    summary = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 prints
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0
