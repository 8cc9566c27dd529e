"""Learning LeanK masks: two-stage distillation (DESIGN.md §1).

    from leank.train import TrainConfig, train
    summary = train(TrainConfig(model="smollm2-135m", sparsities=(0.7, 0.8), out="runs/smollm2"))

Command line: ``leank train --model smollm2-135m --sparsity 0.7 0.8 --align 16 --out runs/smollm2``;
on N GPUs: ``torchrun --nproc_per_node N --no-python leank train ... --batch B`` (:mod:`.distributed`).
"""

from .config import TrainConfig
from .trainer import Trainer, load_alpha, train

__all__ = ["TrainConfig", "Trainer", "load_alpha", "train"]
