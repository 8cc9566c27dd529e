"""The report on a hand-made, partly finished results directory: tables with sample
counts and averages, the plots, and the agreement section when agreement.json exists."""

from __future__ import annotations

import json

import pytest

from leank.errors import LeanKError
from leank.eval.report import ACCURACY_PLOT, AGREEMENT_PLOT, collect_results, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def agreement_json(path):
    entries = [
        {"method": m, "family": m.split(":")[0], "sparsity": s, "kl_mean": kl, "kl_stderr": kl / 10,
         "top1_mean": 1 - kl, "top1_stderr": 0.01, "kl_per_step": [kl], "top1_per_step": [1 - kl]}
        for m, s, kl in [("full", 0.0, 0.0), ("magnitude:0.5", 0.5, 0.02), ("magnitude:0.7", 0.7, 0.05),
                         ("think:0.7", 0.7, 0.3)]
    ]
    settings = {"model": "fake-model", "length": 4032, "steps": 64, "windows": 8}
    path.write_text(json.dumps({"settings": settings, "methods": entries}))


def test_tables_and_plots(fake_results):
    report = write_report(fake_results).read_text()
    assert len(collect_results(fake_results)) == 15
    assert "# Evaluation report: fake-model" in report and "NVIDIA H100, bfloat16" in report
    assert "Command: `leank eval --model fake-model`" in report
    assert "### 4096 tokens" in report and "### 8192 tokens" in report
    assert "| task | full | magnitude:0.7 | magnitude:0.8 | think:0.7 |" in report
    assert "| niah_single_1 | 100.0 (n=50) | 90.0 (n=50) | 70.0 (n=50) | 20.0 (n=50) |" in report
    assert "| vt | 70.0 (n=50) | 50.0 (n=50) | 30.0 (n=50) | – |" in report  # unfinished cell
    assert "| **average** | **90.0** (2/2 tasks) | **75.0** (2/2 tasks)" in report
    assert "**12.0** (1/2 tasks)" in report  # think at 8192: only one task done
    assert "| magnitude:0.7 | 70.0% | 0.65 | 65.0% | allocated | 20 |" in report
    assert (fake_results / ACCURACY_PLOT).read_bytes().startswith(PNG)
    assert not (fake_results / AGREEMENT_PLOT).exists() and "## Decode agreement" not in report


def test_agreement_section(fake_results):
    agreement_json(fake_results / "agreement.json")
    report = write_report(fake_results).read_text()
    assert "| magnitude:0.7 | 70.0% | 0.0500 ± 0.0050 | 0.950 ± 0.010 |" in report
    assert f"![agreement vs sparsity]({AGREEMENT_PLOT})" in report
    assert (fake_results / AGREEMENT_PLOT).read_bytes().startswith(PNG)


def test_agreement_only_and_empty(tmp_path):
    with pytest.raises(LeanKError, match="no finished runs"):
        write_report(tmp_path)
    agreement_json(tmp_path / "agreement.json")
    assert "## Decode agreement" in write_report(tmp_path).read_text()
    assert not (tmp_path / ACCURACY_PLOT).exists()


def test_frontier_table_and_plot(fake_results):
    """Accuracy against the fraction of dense KV bytes, fewest bytes first per length (the fake
    results hold 1 - sparsity / 2 of the dense bytes)."""
    from leank.eval.report import FRONTIER_PLOT

    report = write_report(fake_results).read_text()
    section = report.split("## Accuracy vs KV bytes")[1]
    rows = [line for line in section.splitlines() if line.startswith("| 4096 |")]
    assert rows == ["| 4096 | magnitude:0.8 | 60.0% | 1.67× | 55.0 | 2 | allocated |",
                    "| 4096 | magnitude:0.7 | 65.0% | 1.54× | 75.0 | 2 | allocated |",
                    "| 4096 | think:0.7 | 65.0% | 1.54× | 15.0 | 2 | allocated |",
                    "| 4096 | full | 100.0% | 1.00× | 90.0 | 2 | allocated |"]
    if (fake_results / ACCURACY_PLOT).exists():  # matplotlib present
        assert (fake_results / FRONTIER_PLOT).read_bytes().startswith(PNG)
