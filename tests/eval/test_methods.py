"""Method strings: parsing, clear errors, masks checked against the model, magnitude masks
calibrated once and reused, seeded random masks."""

from __future__ import annotations

import pytest
import torch

import leank
from leank.errors import LeanKError
from leank.eval import methods as methods_module
from leank.eval.methods import FullMethod, MaskMethod, ThinKMethod, parse_method, parse_methods, prepare_method


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fulll", "unknown method"),
        ("snapkv:0.5", "unknown method"),
        ("full:0.5", "takes no argument"),
        ("think", "needs a sparsity"),
        ("magnitude:", "needs a sparsity"),
        ("leank:", "needs a mask file"),
        ("magnitude:abc", "not a sparsity"),
        ("random:1.5", "sparsity must be in"),
        ("think:-0.1", "sparsity must be in"),
        ("leank:/no/such/mask.safetensors", "existing mask file"),
        ("magnitude:0.7+int3", "KVQuant bits"),
        ("magnitude:0.7+fp8", "not a sparsity"),
        ("think:0.7+int4", "no quantised variant"),
        ("quantized:int8", "takes int4"),
        ("quantized:int4s", "takes int4"),
        ("quantized:int4r", "takes int4"),
        ("quantized:int4g64", "takes int4"),
        ("quantized:", "needs the bits"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(LeanKError, match=message):
        parse_method(text)


def test_labels_slugs_and_settings(all_kept_mask):
    spec = parse_method("magnitude-per-head:0.70", alignment=8)
    assert (spec.kind, spec.sparsity, spec.label, spec.slug) == (
        "magnitude-per-head", 0.7, "magnitude-per-head:0.7", "magnitude-per-head-0.7"
    )
    assert spec.settings() == {"label": "magnitude-per-head:0.7", "alignment": 8}
    leank_spec = parse_method(f"leank:{all_kept_mask}")
    assert (leank_spec.label, leank_spec.slug) == ("leank:all-kept", "leank-all-kept")
    assert len(leank_spec.settings()["mask_sha256"]) == 64
    assert parse_method("random:0.5", seed=3).settings()["seed"] == 3
    assert parse_method("think:0.7").settings()["window"] == 32


def test_quantised_methods(all_kept_mask, tiny_lm, tokenizer, tmp_path):
    spec = parse_method(f"leank:{all_kept_mask}+int4")
    assert (spec.label, spec.family, spec.slug) == ("leank:all-kept+int4", "leank+int4", "leank-all-kept-int4")
    assert spec.settings()["quant"] == {"bits": 4, "group": 32}
    assert parse_method("magnitude:0.7+int8g64").label == "magnitude:0.7+int8g64"
    sym = parse_method(f"leank:{all_kept_mask}+int4s")  # its own run: not resumed from +int4's
    assert (sym.label, sym.family, sym.slug) == ("leank:all-kept+int4s", "leank+int4s", "leank-all-kept-int4s")
    assert sym.settings()["quant"] == {"bits": 4, "group": 32, "symmetric": True}
    method = prepare(f"leank:{all_kept_mask}+int8", tiny_lm, tokenizer, tmp_path)
    cache = method.new_cache(tiny_lm, max_length=40)
    assert cache.quant == leank.KVQuant(8)
    quantized = parse_method("quantized:int4")
    assert (quantized.label, quantized.family, quantized.settings()["backend"]) == (
        "quantized:int4", "quantized:int4", "quanto")


def test_parse_methods_refuses_duplicates_and_nothing():
    with pytest.raises(LeanKError, match="given twice"):
        parse_methods(["full", "magnitude:0.7", "magnitude:0.70"])
    with pytest.raises(LeanKError, match="no method"):
        parse_methods([])


def prepare(text, model, tokenizer, tmp_path, **kwargs):
    return prepare_method(parse_method(text, **kwargs), model, tokenizer, model_name="tiny", mask_dir=tmp_path)


def test_prepared_kinds(tiny_lm, tokenizer, tmp_path, all_kept_mask):
    assert isinstance(prepare("full", tiny_lm, tokenizer, tmp_path), FullMethod)
    think = prepare("think:0.75", tiny_lm, tokenizer, tmp_path)
    assert isinstance(think, ThinKMethod) and think.sparsity == 0.75
    lean = prepare(f"leank:{all_kept_mask}", tiny_lm, tokenizer, tmp_path)
    assert isinstance(lean, MaskMethod) and lean.sparsity == 0.0
    with pytest.raises(LeanKError, match="keeps no channel"):
        prepare("think:0.99", tiny_lm, tokenizer, tmp_path)  # head_dim 16: round(0.16) = 0


def test_mask_for_another_model_is_refused(tiny_lm, tokenizer, tmp_path):
    path = tmp_path / "other.safetensors"
    leank.ChannelMask.full(30, 3, 64).save(path)
    with pytest.raises(LeanKError, match=r"leank:other: mask shape \(30, 3, 64\)"):
        prepare(f"leank:{path}", tiny_lm, tokenizer, tmp_path)


def test_magnitude_mask_is_calibrated_once(tiny_lm, tokenizer, tmp_path, monkeypatch):
    first = prepare("magnitude:0.5", tiny_lm, tokenizer, tmp_path, alignment=4)
    saved = list(tmp_path.glob("*.safetensors"))
    assert [p.name for p in saved] == ["tiny.magnitude-0.5.align4.safetensors"]
    assert first.mask.method == "magnitude" and first.mask.model == "tiny"
    assert abs(first.sparsity - 0.5) <= 0.25  # per-head counts rounded to multiples of 4 of 16

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(methods_module, "magnitude_mask", no_calibration)
    again = prepare("magnitude:0.5", tiny_lm, tokenizer, tmp_path, alignment=4)
    assert torch.equal(again.mask.kept, first.mask.kept)
    # A mask file saved under another model's name is refused, not silently reused.
    saved[0].rename(tmp_path / "other.magnitude-0.5.align4.safetensors")
    with pytest.raises(LeanKError, match="calibrated for 'tiny', not 'other'"):
        prepare_method(parse_method("magnitude:0.5", alignment=4), tiny_lm, tokenizer, model_name="other",
                       mask_dir=tmp_path)


def test_random_mask_is_seeded(tiny_lm, tokenizer, tmp_path):
    a = prepare("random:0.5", tiny_lm, tokenizer, tmp_path, alignment=4, seed=1)
    b = prepare("random:0.5", tiny_lm, tokenizer, tmp_path, alignment=4, seed=1)
    c = prepare("random:0.5", tiny_lm, tokenizer, tmp_path, alignment=4, seed=2)
    assert torch.equal(a.mask.kept, b.mask.kept) and not torch.equal(a.mask.kept, c.mask.kept)
    assert (a.mask.kept_counts % 4 == 0).all()
