"""``leank eval`` and ``leank report``: the evaluation harness on the command line.

    leank eval --model smollm2-135m --methods full leank:MASK.safetensors magnitude:0.7 think:0.7 \\
        --lengths 4096 8192 --samples 50 --batch-size 8 --out runs/eval [--jobs 4] [--agreement]
    leank report runs/eval

``eval`` runs the tasks (resuming a partly finished ``--out``), optionally the decode
agreement, then writes the report. :func:`register` adds both subcommands to the main
``leank`` parser; each handler takes the parsed namespace and returns an exit code.
"""

from __future__ import annotations

import argparse


def eval_command(args: argparse.Namespace) -> int:
    from .._io import check_writable_dir
    from ..data.tasks import TASKS
    from ..errors import LeanKError
    from ..models import load_model
    from .agreement import AgreementConfig, check_context, run_agreement
    from .methods import parse_methods, prepare_methods
    from .runner import EvalConfig, check_results_dir, default_dtype, run_eval, run_eval_in_processes, run_identity

    if args.jobs < 1:
        raise LeanKError(f"--jobs must be at least 1, got {args.jobs}")

    tasks = args.tasks if args.tasks is not None else ([] if args.ruler_jsonl else list(TASKS))
    cfg = EvalConfig(
        model=args.model, methods=args.methods, tasks=tasks, lengths=args.lengths, samples=args.samples,
        batch_size=args.batch_size, seed=args.seed, out=args.out, ruler_jsonl=args.ruler_jsonl,
        alignment=args.align, device=args.device, dtype=args.dtype,
    )
    agreement = None
    if args.agreement:
        specs = (parse_methods(args.agreement_methods, alignment=cfg.alignment, seed=cfg.seed)
                 if args.agreement_methods else cfg.method_specs)
        length = args.agreement_length or min(cfg.lengths) - args.agreement_steps
        agreement = AgreementConfig(length=length, steps=args.agreement_steps, windows=args.agreement_windows,
                                    batch_size=cfg.batch_size)
    # Before the model loads: the device, the results directory's owner, that it can be written.
    check_results_dir(cfg.out, run_identity(cfg, dtype=default_dtype(cfg)))
    check_writable_dir(cfg.out)
    parallel = args.jobs > 1 and len(cfg.methods) > 1
    model = tokenizer = None
    if agreement or not parallel:
        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    if agreement:  # fail on bad agreement settings now, not after the task runs
        check_context(model, agreement, model_name=cfg.model)
        methods = prepare_methods(specs, model, tokenizer, model_name=cfg.model, mask_dir=cfg.out / "masks")
    if parallel:
        run_eval_in_processes(cfg, args.jobs)
    else:
        run_eval(cfg, model=model, tokenizer=tokenizer)
    if agreement:
        run_agreement(model, tokenizer, methods, agreement, model_name=cfg.model, out=cfg.out)
    return _report(cfg.out)


def _report(results_dir) -> int:
    from .report import write_report

    notes: list[str] = []
    path = write_report(results_dir, notes=notes)
    print(path.read_text(encoding="utf-8"))
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {path}")
    return 0


def report_command(args: argparse.Namespace) -> int:
    return _report(args.results_dir)


def register(subparsers) -> None:
    """Add ``eval`` and ``report`` to the ``leank`` CLI's subparsers."""
    p = subparsers.add_parser("eval", help="RULER-style tasks (and decode agreement) for several methods")
    p.add_argument("--model", default="smollm2-135m", help="alias, HF id, local directory or .gguf")
    p.add_argument("--methods", nargs="+", required=True, metavar="METHOD",
                   help="full, leank:PATH, magnitude:S, magnitude-per-head:S, random:S, think:S "
                        "(S: fraction of K channels pruned)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="RULER tasks (default: all; none when --ruler-jsonl is given)")
    p.add_argument("--lengths", nargs="+", type=int, default=[4096], help="tokens per sample, answer included")
    p.add_argument("--samples", type=int, default=50, help="samples per task and length")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval", help="results directory (finished runs there are skipped)")
    p.add_argument("--ruler-jsonl", nargs="+", default=[], metavar="FILE", help="task files made by NVIDIA/RULER")
    p.add_argument("--align", type=int, default=16, help="alignment of magnitude/random masks' per-head counts")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--jobs", type=int, default=1,
                   help="methods evaluated side by side, each in its own process (evaluation is bound by the host: "
                        "on a GPU several run at nearly the speed of one)")
    p.add_argument("--agreement", action="store_true", help="also measure decode agreement with the full cache")
    p.add_argument("--agreement-methods", nargs="+", default=None, metavar="METHOD",
                   help="methods for the agreement (default: --methods), e.g. a sparsity sweep")
    p.add_argument("--agreement-length", type=int, default=None,
                   help="prefilled tokens (default: the shortest --lengths minus --agreement-steps)")
    p.add_argument("--agreement-steps", type=int, default=64)
    p.add_argument("--agreement-windows", type=int, default=8)
    p.set_defaults(run=eval_command)

    p = subparsers.add_parser("report", help="markdown tables and plots of a `leank eval` results directory")
    p.add_argument("results_dir")
    p.set_defaults(run=report_command)
