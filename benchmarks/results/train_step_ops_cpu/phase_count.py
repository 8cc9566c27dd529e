"""Top-level aten calls per phase of one SmolLM2 training step on the CPU (fp32, a 600-token sample),
with and without recomputing the attention in the backward pass. (At ba0a851 the teacher's scale
argument was ``torch.ones_like(alpha)``; it is ``None`` since.)

    python benchmarks/results/train_step_ops_cpu/phase_count.py
"""

import collections

import torch
from torch.profiler import ProfilerActivity, profile

from leank.data.training import TrainDataConfig, TrainSampler
from leank.masks import kv_shape
from leank.models import load_model
from leank.train.distill import decode_hidden, distill_loss, prompt_cache

torch.set_num_threads(2)
model, tok = load_model("smollm2-135m", device="cpu", dtype="float32")
model.requires_grad_(False)
s = TrainSampler(tok, TrainDataConfig(min_length=600, max_length=600, seed=0)).sample_at(1)
ids = s.input_ids[None]
alpha = torch.full(kv_shape(model.config), 0.5, requires_grad=True)


def count(fn):
    with profile(activities=[ProfilerActivity.CPU]) as p:
        out = fn()
    ev = [e for e in p.events() if e.name.startswith("aten::")]
    top = [e for e in ev if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return out, len(top), collections.Counter(e.name for e in top)


def phases(recompute: bool) -> None:
    prompt, n, _ = count(lambda: prompt_cache(model, ids, s.context_end))
    with torch.no_grad():
        teacher, nt, _ = count(lambda: decode_hidden(model, ids, prompt, None, sink=32, recent=64))
    loss, nf, _ = count(lambda: distill_loss(model, ids, s.context_end, s.answer_mask, alpha, sink=32, recent=64,
                                             prompt=prompt, teacher=teacher, checkpoint=recompute))
    _, nb, _ = count(lambda: loss.backward())
    print("recompute", recompute, "prompt", n, "teacher", nt, "student fwd", nf, "bwd", nb)


phases(True)
phases(False)
