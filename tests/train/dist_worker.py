"""One torchrun worker of tests/train/test_distributed.py (not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/dist_worker.py SPEC.json

SPEC lists jobs run one after the other in the same processes; each calls ``leank train``
(``argv``) or :func:`leank.train.train` (``config``), which joins the job from torchrun's
environment and leaves it at the end. Ranks other than 0 get an ``out`` of their own
(``<out>-rank<r>``) that must stay absent: proof that they write nothing. Every rank saves
the α each stage returned, or the error, to ``<dump>/rank<r>-<job>.pt``.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

from leank.cli import main as cli_main
from leank.errors import LeanKError
from leank.train import TrainConfig, train
from leank.train import trainer as trainer_mod


def run_job(job: dict, rank: int) -> dict:
    alphas: dict = {}
    original_run_stage, original_sync = trainer_mod.Trainer.run_stage, trainer_mod.sync_grad

    def recording_run_stage(self, stage, *args, **kwargs):
        alphas[stage] = original_run_stage(self, stage, *args, **kwargs).detach().cpu().clone()
        return alphas[stage]

    trainer_mod.Trainer.run_stage = recording_run_stage
    if job.get("no_allreduce"):  # the bug the tests must catch: each rank steps on its own gradient
        trainer_mod.sync_grad = lambda dist, alpha, distill: distill
    try:
        if "argv" in job:
            argv = list(job["argv"])
            if rank:
                argv[argv.index("--out") + 1] += f"-rank{rank}"
            if cli_main(argv) != 0:
                return {"stages": alphas, "error": "exit status != 0"}
        else:
            cfg = dict(job["config"], sparsities=tuple(job["config"]["sparsities"]))
            if rank:
                cfg["out"] += f"-rank{rank}"
            train(TrainConfig(**cfg), resume=job.get("resume", False), progress=False)
    except LeanKError as e:
        return {"stages": alphas, "error": str(e)}
    finally:
        trainer_mod.Trainer.run_stage, trainer_mod.sync_grad = original_run_stage, original_sync
    return {"stages": alphas, "error": None}


def main() -> None:
    spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
    signal.alarm(spec["timeout_s"])  # a hang (a collective one rank never joins) ends the process
    rank = int(os.environ["RANK"])
    for job in spec["jobs"]:
        result = run_job(job, rank)
        torch.save(result, os.path.join(spec["dump"], f"rank{rank}-{job['name']}.pt"))


if __name__ == "__main__":
    main()
