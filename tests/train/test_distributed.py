"""Mask training over 2 processes (torchrun, gloo, CPU) against the single-process run.

One torchrun launch (tests/train/dist_worker.py) runs every distributed job; the
single-process references are trained here. A hang fails the test after a timeout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leank.errors import LeanKError
from leank.masks import ChannelMask
from leank.train import train
from leank.train import trainer as trainer_mod

from ..torchrun import ROOT, rank_log, torchrun
from .test_train import config, tiny_dir  # noqa: F401  (tiny_dir is a fixture)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
    ),
]

TIMEOUT_S = 120
# Global batch 3 over 2 processes: shares of 2 and 1 samples (weighting is tested too).
# lr1 and λ such that the distillation gradient, not the L1 penalty, dominates stage 1 within 4 steps.
SETTINGS = dict(batch=3, stage1_steps=4, stage2_steps=2, validation_samples=3, lr1=0.1, reg=0.002)


def cli_argv(model_dir, out) -> list[str]:
    """``leank train`` arguments equal to :func:`config` with ``SETTINGS``."""
    options = {"--model": model_dir, "--out": out, "--sparsity": 0.75, "--align": 4, "--sink": 4, "--recent": 8,
               "--min-length": 300, "--max-length": 420, "--steps1": 4, "--steps2": 2, "--batch": 3,
               "--validation-samples": 3, "--lr1": SETTINGS["lr1"], "--reg": SETTINGS["reg"], "--device": "cpu",
               "--dtype": "float32", "--workers": 0, "--checkpoint-every": 2}  # fmt: skip
    return ["train", *(str(x) for option in options.items() for x in option)]


def run_jobs(spec_path: Path, log_dir: Path) -> None:
    torchrun(ROOT / "tests/train/dist_worker.py", [str(spec_path)], log_dir, TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "dump").mkdir()
    cfg = lambda name, **kw: config(tiny_dir, tmp / name, **{**SETTINGS, **kw})  # noqa: E731
    train(cfg("single"), progress=False)
    train(cfg("single_batch2", batch=2), progress=False)

    # A single-process run killed in stage-1 step 3 (checkpoint at step 2), resumed below by 2 processes.
    calls = {"n": 0}
    original = trainer_mod.Trainer._sample_loss

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 * SETTINGS["batch"] + 1:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_mod.Trainer, "_sample_loss", dying)
        mp.setattr(trainer_mod.Trainer, "check_memory", lambda self: {})  # count training samples only
        with pytest.raises(KeyboardInterrupt):
            train(cfg("resumed"), progress=False)

    as_json = lambda c: json.loads(json.dumps(c.to_dict()))  # noqa: E731
    jobs = [
        {"name": "cli", "argv": cli_argv(tiny_dir, tmp / "cli")},
        {"name": "no_allreduce", "config": as_json(cfg("no_allreduce")), "no_allreduce": True},
        {"name": "resumed", "config": as_json(cfg("resumed")), "resume": True},
        # FSDP needs equal shares (batch 2); 3 validation samples make rank 1 run a padding pass.
        {"name": "fsdp", "config": as_json(cfg("fsdp", batch=2, fsdp=True))},
        {"name": "small_batch", "config": as_json(cfg("small_batch", batch=1))},
        {"name": "fsdp_odd", "config": as_json(cfg("fsdp_odd", fsdp=True))},
    ]
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs, "dump": str(tmp / "dump"), "timeout_s": TIMEOUT_S - 10}))
    run_jobs(spec, tmp / "logs")
    return tmp


def dumped(runs: Path, rank: int, job: str) -> dict:
    return torch.load(runs / "dump" / f"rank{rank}-{job}.pt", weights_only=True)


def final_alphas(run_dir: Path) -> dict[str, torch.Tensor]:
    """α after stage 1 (alpha.safetensors) and after stage 2 (its last checkpoint)."""
    stage2 = torch.load(run_dir / "checkpoints" / "stage2-0.75.pt", weights_only=True)
    return {"stage1": load_file(str(run_dir / "alpha.safetensors"))["alpha"], "stage2-0.75": stage2["alpha"]}


def log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def assert_same_run(run_dir: Path, single: Path) -> None:
    got, want = final_alphas(run_dir), final_alphas(single)
    for stage in want:
        torch.testing.assert_close(got[stage], want[stage], rtol=1e-5, atol=1e-6, msg=stage)
    assert torch.equal(
        ChannelMask.load(run_dir / "mask-0.75.safetensors").kept,
        ChannelMask.load(single / "mask-0.75.safetensors").kept,
    )
    a, b = log(run_dir), log(single)
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]  # each step logged once
    for key in ("distill", "loss", "mean_alpha"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-7), key


def test_two_processes_equal_one_process(runs):
    assert_same_run(runs / "cli", runs / "single")
    summary = json.loads((runs / "cli" / "summary.json").read_text())
    want = json.loads((runs / "single" / "summary.json").read_text())
    assert (summary["processes"], want["processes"]) == (2, 1)
    # validation split over the ranks (3 samples: 2 + 1) and summed
    assert summary["stages"]["stage1"]["validation_distill"] == pytest.approx(
        want["stages"]["stage1"]["validation_distill"], rel=1e-5
    )
    # α is replicated: rank 1 ends with exactly rank 0's α
    rank0, rank1 = dumped(runs, 0, "cli"), dumped(runs, 1, "cli")
    assert rank0["error"] is None and rank1["error"] is None
    for stage, alpha in rank0["stages"].items():
        assert torch.equal(alpha, rank1["stages"][stage]), stage


def test_only_rank0_writes_and_reports(runs):
    assert {p.name for p in (runs / "cli").iterdir()} >= {
        "config.json",
        "log.jsonl",
        "alpha.safetensors",
        "mask-0.75.safetensors",
        "summary.json",
        "checkpoints",
    }
    # rank 1 was given an --out of its own: it must not even have been created
    assert not [p.name for p in runs.iterdir() if "-rank1" in p.name]
    logs = runs / "logs"
    assert "stage1" in rank_log(logs, 0, "stderr") and "stage1" not in rank_log(logs, 1, "stderr")  # progress bars
    assert '"stages"' in rank_log(logs, 0, "stdout") and '"stages"' not in rank_log(logs, 1, "stdout")


def test_without_gradient_allreduce_the_result_differs(runs):
    """The same comparison fails if each rank stepped on its own share's gradient."""
    got, want = final_alphas(runs / "no_allreduce"), final_alphas(runs / "single")
    rank0, rank1 = dumped(runs, 0, "no_allreduce"), dumped(runs, 1, "no_allreduce")
    for stage in want:
        diff = (got[stage] - want[stage]).abs().max().item()
        diff2 = (rank0["stages"][stage] - rank1["stages"][stage]).abs().max().item()
        # equal runs agree to 1e-5 (bitwise, on this machine); these differ by > 1e-2
        assert diff > 5e-3 and diff2 > 5e-3, (stage, diff, diff2)


def test_resume_a_single_process_checkpoint_on_two_processes(runs):
    assert_same_run(runs / "resumed", runs / "single")


def test_fsdp_on_cpu_gloo_equals_one_process(runs):
    assert dumped(runs, 0, "fsdp")["error"] is None
    assert_same_run(runs / "fsdp", runs / "single_batch2")
    summary = json.loads((runs / "fsdp" / "summary.json").read_text())
    want = json.loads((runs / "single_batch2" / "summary.json").read_text())
    assert summary["stages"]["stage2-0.75"]["validation_distill_after"] == pytest.approx(
        want["stages"]["stage2-0.75"]["validation_distill_after"], rel=1e-5
    )


def test_bad_setups(runs, tiny_dir, tmp_path):  # noqa: F811
    for rank in (0, 1):
        assert "--batch 1 is smaller than the 2 processes" in dumped(runs, rank, "small_batch")["error"]
        assert "--fsdp needs --batch to be a multiple of the 2 processes" in dumped(runs, rank, "fsdp_odd")["error"]
    with pytest.raises(LeanKError, match="--fsdp shards the model over torchrun processes"):
        train(config(tiny_dir, tmp_path / "f", fsdp=True), progress=False)
