# ruff: noqa  (run from the repository root: python benchmarks/results/train_step_ops_cpu/batched_teacher.py)
"""Top-level aten calls of one training step of the trainer's objective on SmolLM2-135M (CPU fp32, one
600-token sample): teacher and student as two passes and as one batched pass (``one_pass``); and the step's
wall time on this CPU (1 thread; compute-bound here, unlike a GPU running this small model)."""
import sys, torch
sys.path.insert(0, "benchmarks")
from torch.profiler import ProfilerActivity, profile
from leank.data.training import TrainDataConfig, TrainSampler
from leank.masks import kv_shape
from leank.models import load_model
from leank.train.distill import binary_scale, decode_hidden, distill_loss, prompt_cache

torch.set_num_threads(1)
model, tok = load_model("smollm2-135m", device=torch.device("cpu"), dtype="float32")
model.requires_grad_(False)
sampler = TrainSampler(tok, TrainDataConfig(min_length=600, max_length=600, seed=0))
s = sampler.sample_at(0)
ids = s.input_ids[None]
alpha = torch.full(kv_shape(model.config), 0.5, requires_grad=True)
kw = dict(sink=32, recent=64)

import time


def step(batched, sparsity):
    scale, empty = (alpha, None) if sparsity is None else binary_scale(alpha, sparsity, 16)
    prompt = prompt_cache(model, ids, s.context_end)
    teacher = None
    if not batched:
        with torch.no_grad():
            teacher = decode_hidden(model, ids, prompt, None, **kw)
    loss = distill_loss(model, ids, s.context_end, s.answer_mask, scale, empty_heads=empty, prompt=prompt,
                        teacher=teacher, one_pass=batched, **kw)
    loss.backward()
    alpha.grad = None
    return loss.item()

for sparsity in (None, 0.7):
    for batched in (False, True):
        step(batched, sparsity)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            step(batched, sparsity)
            times.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss = step(batched, sparsity)
        aten = [e for e in prof.events() if e.name.startswith("aten::")]
        top = sum(1 for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        print(f"stage {'1' if sparsity is None else '2'} {'one batched pass ' if batched else 'two passes       '}: "
              f"{top} top-level aten calls, loss {loss:.6f}, CPU step {sorted(times)[1]:.3f} s (median of 3)", flush=True)
