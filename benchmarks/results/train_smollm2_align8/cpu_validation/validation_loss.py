"""Held-out distillation loss of the committed stage-1 α binarised at align 8, on the CPU in fp32.

    python benchmarks/results/train_smollm2_align8/cpu_validation/validation_loss.py 16 0.85 0.855 0.9

(arguments: validation samples, then binarisation targets). Output of that command: output.txt.
"""

import sys
import time

import torch

from leank.train.config import TrainConfig
from leank.train.trainer import Trainer, load_alpha

torch.set_num_threads(2)
a = load_alpha("benchmarks/results/train_smollm2/alpha.safetensors")
cfg = TrainConfig(model="smollm2-135m", sparsities=[0.85], alignment=8, device="cpu", dtype="float32",
                  out="/tmp/val/run", validation_samples=int(sys.argv[1]), sink=32, recent=64)
t = Trainer(cfg, progress=False)
print("memcheck", t.memory_check, flush=True)
for s in map(float, sys.argv[2:]):
    t0 = time.time()
    print(s, t.validation_loss(a, s), round(time.time() - t0, 1), flush=True)
