"""`leank bench` pieces that run without a GPU: input errors and the summary arithmetic."""

from __future__ import annotations

import torch

from leank import bench
from leank.cli import main


def test_bench_refuses_cleanly_without_cuda_or_with_bad_input(capsys):
    if not torch.cuda.is_available():
        assert main(["bench", "--model", "smollm2-135m"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["bench", "--batches", "0"]) == 2
    assert "--batches must be positive" in capsys.readouterr().err


def test_summary_ratios_from_rows():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    full_tps, leank_tps = (torch.rand(2, generator=gen) * 100 + 1).tolist()
    full_rows, leank_rows = torch.randint(1, 50, (2,), generator=gen).tolist()
    note = "largest batch both full and leank fit"
    rows = [
        {"method": "full", "batch": 7, "prompt": 512, "tokens_per_s": full_tps, "note": note},
        {"method": "leank", "batch": 7, "prompt": 512, "tokens_per_s": leank_tps, "note": note},
        {"method": "full", "batch": 1, "prompt": 512, "tokens_per_s": 1.0},  # not at the shared batch
    ]
    capacity = [
        {"method": "full", "prompt": 512, "cached_tokens": full_rows * 548},
        {"method": "leank", "prompt": 512, "cached_tokens": leank_rows * 548},
    ]
    summary = bench.summarize(rows, capacity)
    ratio = summary["speedup"]["prompt 512, batch 7"]["leank_over_full"]
    assert abs(ratio - leank_tps / full_tps) < 1e-12
    assert abs(summary["cached_tokens_at_budget"][512]["leank_over_full"] - leank_rows / full_rows) < 1e-12
