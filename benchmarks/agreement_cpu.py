"""Decode agreement (KL, top-1) of compressed caches vs the full cache on SmolLM2-135M, CPU.

Static magnitude masks, ThinK and the learned LeanK masks at 70% and 80%, teacher-forced on
the bundled prose (a small CPU run: 2 text windows × 16 steps by default). Writes
agreement.json next to the GPU accuracy results so that `leank report` draws the curve.

    python benchmarks/agreement_cpu.py --out benchmarks/results/eval_smollm2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402

import leank  # noqa: E402
from leank.eval.agreement import AgreementConfig, run_agreement  # noqa: E402
from leank.eval.methods import parse_methods, prepare_methods  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/eval_smollm2")
    parser.add_argument("--length", type=int, default=2016)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = leank.load_model("smollm2-135m", device="cpu")
    masks = [str(leank.bundled_mask_path("smollm2-135m", s)) for s in (0.7, 0.8)]
    names = ["full", *(f"leank:{m}" for m in masks), "magnitude:0.7", "magnitude:0.8", "think:0.7"]
    methods = prepare_methods(parse_methods(names), model, tok, model_name="smollm2-135m",
                              mask_dir=Path(args.out) / "masks")
    cfg = AgreementConfig(length=args.length, steps=args.steps, windows=args.windows, batch_size=2)
    result = run_agreement(model, tok, methods, cfg, model_name="smollm2-135m", out=Path(args.out))
    for row in result["methods"]:
        print(f"{row['method']:<36} KL {row['kl_mean']:.4f} ± {row['kl_stderr']:.4f}  top-1 {row['top1_mean']:.3f}")
    print(environment())


if __name__ == "__main__":
    main()
