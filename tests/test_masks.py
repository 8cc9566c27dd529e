"""ChannelMask: binarisation rule, statistics, persistence and validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import leank
from leank.masks import ChannelMask, binarize

# The authors' released masks, shipped in the package (leank/masks/README.md: source, licence).
REFERENCE = Path(__file__).resolve().parents[1] / "leank" / "masks"


def reference_binarize(scores, sparsity, alignment):
    """DESIGN.md §1 stage 2, written out with plain Python lists."""
    flat = sorted(scores.flatten().tolist())
    num_pruned = round(sparsity * len(flat))
    threshold = flat[num_pruned - 1] if num_pruned else float("-inf")
    L, H, D = scores.shape
    kept = torch.zeros(L, H, D, dtype=torch.bool)
    for layer in range(L):
        for head in range(H):
            row = scores[layer, head].tolist()
            above = sum(1 for x in row if x > threshold)
            count = min(D, int(above / alignment + 0.5) * alignment)
            top = sorted(range(D), key=lambda c: (-row[c], c))[:count]
            kept[layer, head, top] = True
    return kept


@pytest.mark.parametrize("alignment", [1, 8, 16])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.7, 0.8, 0.95])
def test_binarize_matches_reference(sparsity, alignment):
    scores = torch.rand(5, 3, 32)
    mask = binarize(scores, sparsity=sparsity, alignment=alignment)
    assert torch.equal(mask.kept, reference_binarize(scores, sparsity, alignment))
    counts = mask.kept_counts
    assert (counts % alignment == 0).all()
    # Rounding each head's count to the alignment moves the total by at most alignment/2 per head.
    assert abs(mask.sparsity - sparsity) <= alignment / 2 / 32 + 1e-9


def test_per_head_budget():
    mask = binarize(torch.rand(4, 2, 64), sparsity=0.75, alignment=16, per_head=True)
    assert (mask.kept_counts == 16).all()


def test_statistics_against_hand_count():
    kept = torch.zeros(2, 2, 8, dtype=torch.bool)
    kept[0, 0, :4] = True
    kept[1, 1] = True
    mask = ChannelMask(kept, alignment=4)
    assert mask.sparsity == pytest.approx(1 - 12 / 32)
    assert mask.fully_pruned_heads == 2
    assert mask.count_histogram() == {0: 2, 4: 1, 8: 1}
    # middle token keeps 12/32 of K and the V of 2 heads out of 4
    assert mask.kv_bytes_fraction == pytest.approx((12 / 32 + 2 / 4) / 2)


def test_save_load_roundtrip(tmp_path):
    mask = binarize(torch.rand(3, 2, 16), sparsity=0.5, alignment=4, model="tiny", sink=7, recent=9)
    path = mask.save(tmp_path / "m.safetensors")
    loaded = ChannelMask.load(path)
    assert torch.equal(loaded.kept, mask.kept)
    assert (loaded.model, loaded.alignment, loaded.sink, loaded.recent) == ("tiny", 4, 7, 9)
    assert loaded.info["target_sparsity"] == 0.5
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


@pytest.mark.parametrize(
    "name,shape,pruned,fully,hist",
    [
        ("llama3.1-8b-instruct", (32, 8, 128), 0.6875, 47, {0: 47, 32: 120, 64: 67, 96: 22}),
        ("qwen2.5-7b-instruct", (28, 4, 128), 0.7098, 35, {0: 35, 32: 34, 64: 33, 96: 10}),
    ],
)
def test_authors_masks_load_with_published_statistics(name, shape, pruned, fully, hist):
    mask = ChannelMask.load(REFERENCE / f"{name}.leank-mask.safetensors")
    assert tuple(mask.kept.shape) == shape
    assert mask.sparsity == pytest.approx(pruned, abs=5e-5)
    assert mask.fully_pruned_heads == fully
    assert mask.count_histogram() == hist


@pytest.mark.parametrize("method,sparsity,align", [("leank", 0.7, 16), ("leank", 0.8, 16), ("leank", 0.85, 8),
                                                  ("leank", 0.9, 8), ("magnitude", 0.7, 16)])
def test_bundled_masks_fit_smollm2_shape(method, sparsity, align):
    mask = ChannelMask.load(leank.bundled_mask_path("smollm2-135m", sparsity, method=method))
    assert tuple(mask.kept.shape) == (30, 3, 64)
    assert mask.method == method and mask.model == "smollm2-135m"
    assert abs(mask.sparsity - sparsity) < 0.025
    assert (mask.kept_counts % align == 0).all()


def test_default_bundled_mask_is_learned_70():
    assert leank.bundled_mask_path("smollm2-135m").name == "smollm2-135m.leank-0.70.safetensors"
    with pytest.raises(leank.LeanKError, match="no bundled mask"):
        leank.bundled_mask_path("llama-70b")


def test_authors_like_distribution_matches_reference_histogram():
    from leank.masks import authors_like_mask

    mask = authors_like_mask(torch.rand(32, 8, 128))
    assert mask.count_histogram() == {0: 47, 32: 120, 64: 67, 96: 22}
    assert mask.sparsity == pytest.approx(0.6875)


# ---- ties and odd inputs (issue 11) ------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from leank.masks import aligned_counts  # noqa: E402


@st.composite
def tied_scores(draw):
    """Scores ``[L, H, D]`` drawn from a handful of values (many ties), with an alignment
    dividing D and a sparsity in [0, 1)."""
    layers, heads = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([4, 8, 16, 32, 64]))
    values = draw(st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=1, max_size=4))
    picks = draw(st.lists(st.integers(0, len(values) - 1), min_size=layers * heads * head_dim,
                          max_size=layers * heads * head_dim))
    scores = torch.tensor([values[i] for i in picks], dtype=torch.float32).view(layers, heads, head_dim)
    alignment = draw(st.sampled_from([a for a in (1, 2, 4, 8, 16) if head_dim % a == 0]))
    sparsity = draw(st.floats(0.0, 0.999))
    return scores, alignment, sparsity


def budget_bound(scores, alignment) -> float:
    """|achieved − target| allowed: rounding the total to whole channels (half a channel), and each
    head's count to the alignment (at most alignment / 2 channels per head)."""
    layers, heads, head_dim = scores.shape
    return (0.5 + layers * heads * alignment / 2) / scores.numel() + 1e-9


@settings(max_examples=150, deadline=None)
@given(tied_scores())
def test_binarize_meets_the_budget_with_ties(case):
    scores, alignment, sparsity = case
    mask = binarize(scores, sparsity=sparsity, alignment=alignment)
    counts = mask.kept.sum(-1)
    assert ((counts % alignment) == 0).all()
    assert abs(mask.sparsity - sparsity) <= budget_bound(scores, alignment)
    # Within a head, no pruned channel scores above a kept one.
    for row, kept in zip(scores.view(-1, scores.shape[-1]), mask.kept.view(-1, scores.shape[-1]), strict=True):
        if kept.any() and (~kept).any():
            assert row[kept].min() >= row[~kept].max()
    # Deterministic: the same scores give the same mask.
    assert torch.equal(binarize(scores.clone(), sparsity=sparsity, alignment=alignment).kept, mask.kept)


@settings(max_examples=150, deadline=None)
@given(tied_scores())
def test_aligned_counts_with_ties(case):
    scores, alignment, sparsity = case
    counts = aligned_counts(scores, sparsity, alignment)
    head_dim = scores.shape[-1]
    assert counts.shape == scores.shape[:2] and counts.dtype == torch.long
    assert ((counts % alignment) == 0).all() and (counts >= 0).all() and (counts <= head_dim).all()
    target_kept = scores.numel() - round(sparsity * scores.numel())  # plain arithmetic, not the code under test
    assert abs(int(counts.sum()) - target_kept) <= scores.shape[0] * scores.shape[1] * alignment / 2
    if alignment == 1:
        assert int(counts.sum()) == target_kept


@settings(max_examples=60, deadline=None)
@given(tied_scores())
def test_binarize_alignment_one_keeps_the_highest_scores_globally(case):
    scores, _, sparsity = case
    mask = binarize(scores, sparsity=sparsity, alignment=1)
    assert int(mask.kept.sum()) == scores.numel() - round(sparsity * scores.numel())
    if mask.kept.any() and (~mask.kept).any():
        assert scores[mask.kept].min() >= scores[~mask.kept].max()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.71, 0.9])
def test_constant_scores_hit_the_target(sparsity):
    # The example: every score equal (α before training, or all-zero calibration).
    mask = binarize(torch.ones(30, 3, 64), sparsity=sparsity, alignment=16)
    assert abs(mask.sparsity - sparsity) <= 0.5 / 5760 + 90 * 8 / 5760
    assert mask.sparsity < 1.0 and (mask.kept_counts % 16 == 0).all()


def test_sparsity_as_numpy_or_torch_scalar():
    import numpy as np

    scores = torch.rand(3, 2, 16, generator=torch.Generator().manual_seed(0))
    expected = binarize(scores, sparsity=0.7, alignment=4).kept
    for value in (np.float32(0.7), np.float64(0.7), torch.tensor(0.7, dtype=torch.float64)):
        assert torch.equal(binarize(scores, sparsity=value, alignment=4).kept, expected)
    for bad in (True, np.bool_(False), torch.tensor(True), "0.7", None, torch.tensor([0.1, 0.2]), float("inf")):
        with pytest.raises(leank.LeanKError, match=r"sparsity must be in \[0, 1\)"):
            binarize(scores, sparsity=bad)


def test_nan_scores_refused():
    scores = torch.rand(2, 2, 8)
    scores[1, 0, 3] = float("nan")
    with pytest.raises(leank.LeanKError, match="NaN"):
        binarize(scores, sparsity=0.5)


def test_hybrid_model_calibration_and_metadata(tmp_path, capsys):
    """A magnitude mask for a hybrid model covers its full-attention layers only, records them,
    survives a save/load, and `leank info` shows them."""
    from leank.calibrate import channel_magnitudes, magnitude_mask
    from leank.cli import main

    from .conftest import tiny_model

    model = tiny_model("gemma2", layers=4, qk_gain=3.0)  # layers 1 and 3 are full attention
    batches = [torch.randint(3, 97, (2, 6))]  # within the window: layer types change no activation
    scores = channel_magnitudes(model, batches, progress=False)
    model.config.layer_types = ["full_attention"] * 4  # every layer scored: rows 1 and 3 must be layers 1, 3
    every = channel_magnitudes(model, batches, progress=False)
    model.config.layer_types = ["sliding_attention", "full_attention"] * 2
    torch.testing.assert_close(scores, every[[1, 3]])
    mask = magnitude_mask(model, batches, sparsity=0.5, alignment=4, progress=False)
    assert mask.layers == (1, 3) and mask.kept.shape == (2, 2, 16)
    path = mask.save(tmp_path / "m.safetensors")
    assert ChannelMask.load(path).layers == (1, 3)
    leank.LeanKCache(model, ChannelMask.load(path))
    assert main(["info", str(path)]) == 0
    assert "compressed model layers      [1, 3]" in capsys.readouterr().out


@pytest.mark.parametrize("name, alias", [
    ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
    ("/models/Qwen2.5-7B-Instruct/", "qwen2.5-7b-instruct"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),
    ("smollm2-135m", "smollm2-135m"),
    ("llama3.1-8b-shape", "llama-3.1-8b-instruct"),  # the random-weight shapes: their model's mask
    ("qwen2.5-7b-shape", "qwen2.5-7b-instruct"),
])
def test_bundled_mask_picked_by_name(name, alias):
    from leank.resources import bundled_model

    assert bundled_model(name) == alias
    assert leank.bundled_mask_path(name).is_file()


def test_bundled_mask_picked_by_config_shape_and_fits(tmp_path):
    """A config with no known name is matched by its shape (here Qwen2.5-7B's), and the mask
    picked fits it; a model of no bundled shape gets one clear error naming what exists."""
    from transformers import LlamaConfig, Qwen2Config

    from leank.cli import main
    from leank.resources import bundled_model

    qwen = Qwen2Config(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, intermediate_size=18944, max_position_embeddings=32768)
    qwen._name_or_path = "my-finetune"
    assert bundled_model(qwen) == "qwen2.5-7b-instruct"
    ChannelMask.load(leank.bundled_mask_path(qwen)).check_config(qwen)
    qwen.save_pretrained(tmp_path / "my-finetune")
    assert bundled_model(str(tmp_path / "my-finetune")) == "qwen2.5-7b-instruct"
    assert main(["info", "--model", str(tmp_path / "my-finetune")]) == 0
    other = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(leank.LeanKError, match=r"no bundled mask for .*llama-3.1-8b-instruct \(meta-llama/") as e:
        leank.bundled_mask_path(other)
    assert "\n" not in str(e.value)
    for alias in ("llama-3.1-8b-instruct", "qwen2.5-7b-instruct"):  # the authors' masks, shipped in the package
        mask = ChannelMask.load(leank.bundled_mask_path(alias))
        assert mask.kept.shape[0] in (32, 28) and 0.68 < mask.sparsity < 0.72
