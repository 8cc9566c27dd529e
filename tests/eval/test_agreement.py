"""Decode agreement: the full cache agrees exactly with itself, an all-kept LeanK mask to
float precision, a random mask does not; results are written and reused."""

from __future__ import annotations

import json

import pytest

from leank.errors import LeanKError
from leank.eval import agreement as agreement_module
from leank.eval.agreement import AgreementConfig, run_agreement
from leank.eval.methods import parse_methods, prepare_methods

# The masks' sink (32) and recent window (64) are full; 256 prefilled tokens leave 160 in the middle.
CONFIG = AgreementConfig(length=256, steps=6, windows=3, batch_size=2)


def test_agreement(tiny_lm, tokenizer, tmp_path, all_kept_mask, monkeypatch):
    specs = parse_methods(["full", f"leank:{all_kept_mask}", "random:0.5"], alignment=4)
    methods = prepare_methods(specs, tiny_lm, tokenizer, model_name="tiny", mask_dir=tmp_path)
    result = run_agreement(tiny_lm, tokenizer, methods, CONFIG, model_name="tiny", out=tmp_path, progress=False)

    full, lean, rand = result["methods"]
    assert (full["kl_mean"], full["kl_stderr"], full["top1_mean"]) == (0.0, 0.0, 1.0)
    assert full["kl_per_step"] == [0.0] * CONFIG.steps and full["top1_per_step"] == [1.0] * CONFIG.steps
    assert abs(lean["kl_mean"]) < 1e-6 and lean["top1_mean"] == 1.0
    # A random tiny model barely depends on its middle tokens: the signal is small but far above float noise.
    assert rand["kl_mean"] > 10 * abs(lean["kl_mean"]) and rand["kl_stderr"] > 0
    assert rand["sparsity"] == pytest.approx(0.5, abs=0.25)
    assert result["settings"]["windows"] == 3 and result["settings"]["model"] == "tiny"
    assert json.loads((tmp_path / "agreement.json").read_text()) == result

    def no_forward(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(agreement_module, "teacher_forced_logprobs", no_forward)
    assert run_agreement(tiny_lm, tokenizer, methods, CONFIG, model_name="tiny", out=tmp_path) == result


def test_agreement_errors(tiny_lm, tokenizer):
    with pytest.raises(LeanKError, match="steps must be a positive integer"):
        AgreementConfig(steps=0)
    methods = prepare_methods(parse_methods(["full"]), tiny_lm, tokenizer, model_name="tiny", mask_dir=None)
    with pytest.raises(LeanKError, match="1024-token context"):
        run_agreement(tiny_lm, tokenizer, methods, AgreementConfig(length=1000, steps=64), model_name="tiny")
    with pytest.raises(LeanKError, match="fewer than 100 windows"):
        run_agreement(tiny_lm, tokenizer, methods, AgreementConfig(length=900, windows=100), model_name="tiny")
