"""ChannelMask: binarisation rule, statistics, persistence and validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import leank
from leank.masks import ChannelMask, binarize

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


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


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference not present")
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


@pytest.mark.parametrize("method,sparsity", [("leank", 0.7), ("leank", 0.8), ("magnitude", 0.7)])
def test_bundled_masks_fit_smollm2_shape(method, sparsity):
    mask = ChannelMask.load(leank.bundled_mask_path("smollm2-135m", sparsity, method=method))
    assert tuple(mask.kept.shape) == (30, 3, 64)
    assert mask.method == method and mask.model == "smollm2-135m"
    assert abs(mask.sparsity - sparsity) < 0.025
    assert (mask.kept_counts % 16 == 0).all()


def test_default_bundled_mask_is_learned_70():
    assert leank.bundled_mask_path("smollm2-135m").name == "smollm2-135m.leank-0.70.safetensors"
    with pytest.raises(leank.LeanKError, match="no bundled mask"):
        leank.bundled_mask_path("llama-70b")


def test_authors_like_distribution_matches_reference_histogram():
    from leank.masks import authors_like_mask

    mask = authors_like_mask(torch.rand(32, 8, 128))
    assert mask.count_histogram() == {0: 47, 32: 120, 64: 67, 96: 22}
    assert mask.sparsity == pytest.approx(0.6875)
