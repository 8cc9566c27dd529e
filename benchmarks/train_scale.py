"""Mask training at scale: memory and time of one training step per context length, per stage,
and the projected wall time of the paper's recipe (issue 15).

For each context, ``--steps`` steps of each stage (after one untimed warm-up step) on generated
samples of exactly that many tokens, with the objective the trainer uses
(:func:`leank.train.distill.distill_loss`), split into phases: data generation (host), the
prompt pass (teacher K/V, no grad), the teacher's decode region (no grad), the student's
decode region forward, and its backward. Peak GPU memory per stage. A context that runs out
of memory is reported as such (with the peak reached) and the next one is tried.

Projection: the paper trains Llama-3.1-8B for 2000 stage-1 steps at contexts drawn from
4K–96K tokens, then 200 stage-2 steps; seconds per step at a context are interpolated
linearly between the measured contexts (extrapolated from the nearest two outside them) and
averaged over that uniform distribution.

    python benchmarks/train_scale.py --model llama3.1-8b-shape --contexts 8192 32768 65536 131072 \
        --out benchmarks/results/train_scale_h200

Random weights (``*-shape`` models): losses are meaningless, memory and time are real.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402

from leank._defaults import DEFAULT_RECENT, DEFAULT_SINK  # noqa: E402
from leank._io import atomic_write_json, atomic_write_text, make_dirs  # noqa: E402
from leank.data.training import TrainDataConfig, TrainSampler  # noqa: E402
from leank.masks import kv_shape  # noqa: E402
from leank.models import check_device, load_model  # noqa: E402
from leank.train.distill import binary_scale, decode_hidden, distill_loss, prompt_cache  # noqa: E402

PHASES = ("data", "prompt", "teacher", "student_fwd", "student_bwd")
PAPER = {"stage1_steps": 2000, "stage2_steps": 200, "min_context": 4096, "max_context": 98304}


class Clock:
    """Phase timer: ``lap(name)`` adds the time since the last lap (device synchronised) to ``name``."""

    def __init__(self, device):
        self.device, self.times = device, dict.fromkeys(PHASES, 0.0)
        self._sync()
        self.t = time.perf_counter()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lap(self, name: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.times[name] += now - self.t
        self.t = now


def one_step(model, sampler, index, alpha, *, sparsity, alignment, sink, recent, recompute, clock):
    """One training step of a stage (one sample) with the trainer's objective, timed by phase."""
    sample = sampler.sample_at(index)
    ids = sample.input_ids.to(alpha.device)[None]
    clock.lap("data")
    prompt = prompt_cache(model, ids, sample.context_end)
    clock.lap("prompt")
    with torch.no_grad():
        teacher = decode_hidden(model, ids, prompt, None, sink=sink, recent=recent)
    clock.lap("teacher")
    scale, empty = (alpha, None) if sparsity is None else binary_scale(alpha, sparsity, alignment)
    loss = distill_loss(model, ids, sample.context_end, sample.answer_mask.to(alpha.device), scale, sink=sink,
                        recent=recent, empty_heads=empty, prompt=prompt, teacher=teacher, checkpoint=recompute)
    clock.lap("student_fwd")
    loss.backward()
    alpha.grad = None
    clock.lap("student_bwd")
    return sample.input_ids.numel()


def measure(model, tokenizer, context: int, args, device) -> dict:
    row: dict = {"context": context}
    for stage, sparsity in (("stage1", None), ("stage2", args.sparsity)):
        sampler = TrainSampler(tokenizer, TrainDataConfig(min_length=context, max_length=context, seed=args.seed))
        alpha = torch.full(kv_shape(model.config), 0.5, device=device, requires_grad=True)
        kw = dict(sparsity=sparsity, alignment=args.align, sink=args.sink, recent=args.recent,
                  recompute=args.recompute)
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            one_step(model, sampler, 0, alpha, clock=Clock(device), **kw)  # warm-up (untimed)
            clock = Clock(device)
            tokens = [one_step(model, sampler, 1 + i, alpha, clock=clock, **kw) for i in range(args.steps)]
        except torch.cuda.OutOfMemoryError:
            row[stage] = {"error": "out of memory",
                          "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
            print(f"  {context} {stage}: out of memory", flush=True)
            continue
        per_step = {k: v / args.steps for k, v in clock.times.items()}
        row[stage] = {
            "seconds_per_step": sum(per_step.values()),
            "phases": per_step,
            "tokens": sum(tokens) / len(tokens),
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        }
        print(f"  {context} {stage}: {row[stage]['seconds_per_step']:.3f} s/step, peak "
              f"{row[stage]['peak_gib']} GiB, phases " + ", ".join(f"{k} {v:.3f}" for k, v in per_step.items()),
              flush=True)
    return row


def seconds_at(rows: list[dict], stage: str, context: float) -> float | None:
    """Seconds per step at ``context``, linear between the measured contexts (nearest two outside)."""
    points = sorted((r["context"], r[stage]["seconds_per_step"]) for r in rows if "seconds_per_step" in r[stage])
    if len(points) < 2:
        return None
    i = next((k for k in range(1, len(points) - 1) if context <= points[k][0]), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (context - x0) / (x1 - x0)


def projection(rows: list[dict]) -> dict | None:
    """Hours of the paper's recipe, or None when a context in its range was not measured to fit."""
    lo, hi = PAPER["min_context"], PAPER["max_context"]
    fits = [r["context"] for r in rows if all("seconds_per_step" in r[s] for s in ("stage1", "stage2"))]
    if not fits or max(fits) < hi:
        return None
    grid = [lo + (hi - lo) * k / 100 for k in range(101)]
    out = {}
    for stage, steps in (("stage1", PAPER["stage1_steps"]), ("stage2", PAPER["stage2_steps"])):
        mean = sum(seconds_at(rows, stage, c) for c in grid) / len(grid)
        out[f"{stage}_mean_seconds_per_step"] = mean
        out[f"{stage}_hours"] = steps * mean / 3600
    out["hours"] = out["stage1_hours"] + out["stage2_hours"]
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# Mask training at scale: {result['model']}",
        "",
        f"{env.get('gpu', 'CPU')}; torch {env['torch']}, transformers {env['transformers']}. "
        f"Command: `{env['command']}`",
        "",
        f"{result['steps']} timed steps per stage and context (after one warm-up), one sample per step; "
        f"recompute attention in backward: {result['recompute']}. Seconds per step by phase.",
        "",
        "| context | stage | s/step | data | prompt | teacher | student fwd | student bwd | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for stage in ("stage1", "stage2"):
            r = row[stage]
            if "error" in r:
                lines.append(f"| {row['context']} | {stage} | {r['error']} | | | | | | {r['peak_gib']} |")
                continue
            p = r["phases"]
            lines.append(f"| {row['context']} | {stage} | {r['seconds_per_step']:.3f} | "
                         + " | ".join(f"{p[k]:.3f}" for k in PHASES) + f" | {r['peak_gib']} |")
    proj = result["projection"]
    lines += ["", "Paper recipe (2000 stage-1 + 200 stage-2 steps, contexts uniform in 4K–96K): "
              + (f"{proj['hours']:.2f} h projected ({proj['stage1_hours']:.2f} + {proj['stage2_hours']:.2f})."
                 if proj else "not projected (a context up to 96K was not measured to fit).")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama3.1-8b-shape")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--align", type=int, default=16)
    parser.add_argument("--sink", type=int, default=DEFAULT_SINK)
    parser.add_argument("--recent", type=int, default=DEFAULT_RECENT)
    parser.add_argument("--no-recompute", dest="recompute", action="store_false")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device = check_device(args.device)
    model, tokenizer = load_model(args.model, device=device, dtype=args.dtype)
    model.requires_grad_(False)
    rows, env, out = [], environment(), make_dirs(args.out)
    for context in sorted(args.contexts):  # results rewritten after each context: a cut-short run keeps them
        rows.append(measure(model, tokenizer, context, args, device))
        result = {"model": args.model, "environment": env, "steps": args.steps, "recompute": args.recompute,
                  "rows": rows, "projection": projection(rows), "paper": PAPER}
        atomic_write_json(out / "results.json", result)
        atomic_write_text(out / "results.md", markdown(result))
        print(markdown(result), flush=True)
    return result


if __name__ == "__main__":
    from leank.errors import LeanKError

    try:
        main()
    except LeanKError as e:  # e.g. the tokenizer's model file missing: one line, before any GPU work
        sys.exit(f"train_scale.py: error: {e}")
