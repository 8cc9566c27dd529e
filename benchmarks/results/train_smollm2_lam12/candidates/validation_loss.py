"""The λ 0.12 run's stage-1 α binarised at align 8 (no stage 2): the mask file and its held-out distillation
loss on the CPU in fp32 (the trainer's 16 validation samples).

    python benchmarks/results/train_smollm2_lam12/candidates/validation_loss.py 16 0.855 0.858

(arguments: validation samples, then binarisation targets; each target's mask is written beside this file as
mask-stage1-TARGET.safetensors). Output of that command: output.txt.
"""

import sys
import time
from pathlib import Path

import torch

from leank.masks import binarize
from leank.train.config import TrainConfig
from leank.train.trainer import Trainer, load_alpha

HERE = Path(__file__).resolve().parent
torch.set_num_threads(2)
a = load_alpha(str(HERE.parent / "lam12" / "alpha.safetensors"))
cfg = TrainConfig(model="smollm2-135m", sparsities=[0.85], alignment=8, device="cpu", dtype="float32",
                  out="/tmp/val/run", validation_samples=int(sys.argv[1]), sink=32, recent=64, reg=0.12)
t = Trainer(cfg, progress=False)
for s in map(float, sys.argv[2:]):
    mask = binarize(a, sparsity=s, alignment=8, method="leank", model="smollm2-135m", sink=32, recent=64,
                    info={"alpha_from": "stage 1 (lam12/alpha.safetensors)", "target": s})
    mask.save(HERE / f"mask-stage1-{s}.safetensors")
    t0 = time.time()
    print(s, round(mask.sparsity, 4), t.validation_loss(a, s), round(time.time() - t0, 1), flush=True)
