"""Where a mask-training step spends its time (issue 15): torch.profiler tables of training steps
(the trainer's objective, through :func:`train_scale.one_step`) on a real model, per stage.

    python benchmarks/profile_train_step.py > profile.txt

Three warm-up steps, then three profiled ones, per stage; samples of 4K–8K tokens as the SmolLM2
recipe draws them. Prints the phase times (device-synchronised, under the profiler), the number of
top-level aten calls per step (what the host dispatches; on a GPU most launch a kernel — the same
count on any device), and the ops by host time and by device time. ``--device cpu`` (fp32) counts
the calls without a GPU:

    python benchmarks/profile_train_step.py --device cpu --min-length 600 --max-length 600 --steps 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_scale import Clock, one_step  # noqa: E402

from leank.data.training import TrainDataConfig, TrainSampler  # noqa: E402
from leank.masks import kv_shape  # noqa: E402
from leank.models import load_model  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--min-length", type=int, default=4096)
    p.add_argument("--max-length", type=int, default=8192)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    model, tokenizer = load_model(args.model, device=dev, dtype="bfloat16" if dev.type == "cuda" else "float32")
    model.requires_grad_(False)
    for stage, sparsity in (("stage1", None), ("stage2", 0.7)):
        data = TrainDataConfig(min_length=args.min_length, max_length=args.max_length, seed=0)
        sampler = TrainSampler(tokenizer, data)
        alpha = torch.full(kv_shape(model.config), 0.5, device=dev, requires_grad=True)
        kw = dict(sparsity=sparsity, alignment=16, sink=32, recent=64, recompute=True)
        for i in range(args.steps):
            one_step(model, sampler, i, alpha, clock=Clock(dev), **kw)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=activities) as prof:
            clock = Clock(dev)
            for i in range(args.steps, 2 * args.steps):
                one_step(model, sampler, i, alpha, clock=clock, **kw)
        print(stage, {k: round(v / args.steps, 4) for k, v in clock.times.items()})
        aten = [e for e in prof.events() if e.name.startswith("aten::")]
        top = sum(1 for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        print(f"{stage}: {top / args.steps:.0f} top-level aten calls per step")
        table = prof.key_averages().table
        print(table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
        if dev.type == "cuda":
            print(table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
