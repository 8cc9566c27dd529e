"""leank.analysis: RoPE-frequency aggregation, pair consistency, mask comparison, the
``analyze`` command and its errors — on hand-built masks whose answers are known."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

from leank.analysis import (
    as_source,
    compare_masks,
    frequency_profile,
    layer_frequency_profile,
    low_frequency_share,
    pair_consistency,
    pair_states,
    plot_frequency_profiles,
    pruned_heads_per_layer,
    register,
    summary,
)
from leank.errors import LeanKError
from leank.masks import ChannelMask, binarize

# One layer, four heads, head_dim 8 (RoPE pairs (0,4), (1,5), (2,6), (3,7); i = 3 lowest frequency).
HAND = torch.tensor([[
    [0, 0, 0, 1, 0, 0, 0, 1],  # pair 3 both kept
    [0, 0, 1, 1, 0, 0, 0, 0],  # pairs 2 and 3 split
    [0, 0, 0, 0, 0, 0, 0, 0],  # fully pruned
    [1, 1, 1, 1, 1, 1, 1, 1],  # fully kept
]], dtype=torch.bool)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_frequency_profile_on_hand_mask():
    # per i: (kept channels i and i + 4 over the 4 heads) / 8
    assert frequency_profile(HAND).tolist() == [0.25, 0.25, 0.375, 0.625]
    assert layer_frequency_profile(HAND).tolist() == [[0.25, 0.25, 0.375, 0.625]]
    assert low_frequency_share(HAND) == pytest.approx(1.0 / 1.5)  # (3 + 5) / 12 kept entries on i >= 2
    assert low_frequency_share(HAND[:, :2]) == 1.0
    assert low_frequency_share(torch.zeros(1, 1, 8)) is None
    # D = 6: i = 0, 1, 2 and D/4 = 1.5, so only i = 2 (channels 2 and 5) is low-frequency
    assert low_frequency_share(torch.tensor([[[0.0, 0, 1, 0, 0, 1]]])) == 1.0
    assert low_frequency_share(torch.tensor([[[0.0, 1, 0, 0, 1, 0]]])) == 0.0


def test_frequency_pairs_c_with_c_plus_half():
    """α = i / (D/2) on both channels of pair i gives profile[i] = i / (D/2) only if pairs are (c, c + D/2)."""
    d = 16
    alpha = (torch.arange(d) % (d // 2)).float().div(d // 2).expand(3, 2, d).contiguous()
    assert torch.allclose(frequency_profile(alpha), torch.arange(d // 2).float() / (d // 2))
    high = torch.where(torch.arange(d) % (d // 2) < d // 4, 0.2, 0.6).expand(1, 1, d)
    assert low_frequency_share(high) == pytest.approx(0.75)


def test_pair_consistency_hand_cases():
    assert pair_states(HAND).tolist() == [[[0, 0, 0, 2], [0, 0, 1, 1], [0, 0, 0, 0], [2, 2, 2, 2]]]
    pc = pair_consistency(HAND)
    assert pc["all_heads"] == {"pairs": 16, "both_kept": 5, "both_pruned": 9, "split": 2, "same_fraction": 0.875}
    partial = pc["partial_heads"]
    assert (partial["heads"], partial["pairs"], partial["both_kept"], partial["both_pruned"], partial["split"]) == (
        2, 8, 1, 5, 2)
    assert partial["same_fraction"] == 0.75
    # 2 of 8 channels kept at random: P(same) = (2·1 + 6·5) / (8·7)
    assert partial["same_if_random"] == pytest.approx(32 / 56, abs=1e-6)
    only_trivial = pair_consistency(HAND[:, 2:])["partial_heads"]
    assert only_trivial["heads"] == 0 and only_trivial["same_fraction"] is None
    assert only_trivial["same_if_random"] is None


def test_compare_masks_hand_counts():
    a = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 0]], [[1, 0, 0, 0], [0, 0, 1, 1]]], dtype=torch.bool)
    b = torch.tensor([[[1, 0, 1, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 1, 1]]], dtype=torch.bool)
    c = compare_masks(ChannelMask(a), b)
    assert c["jaccard_per_layer"] == pytest.approx([1 / 3, 2 / 3], abs=1e-6)
    assert c["jaccard"] == 0.5
    # random placement with the same per-head counts: layer 0 E∩ = 2·2/4 = 1, E∪ = 3; layer 1 E∩ = 2·2/4 = 1, E∪ = 4
    assert c["jaccard_if_random_per_layer"] == pytest.approx([1 / 3, 0.25], abs=1e-6)
    assert c["jaccard_if_random"] == pytest.approx(2 / 7, abs=1e-6)
    assert c["channels"] == {"kept_in_both": 3, "kept_only_in_a": 2, "kept_only_in_b": 1, "pruned_in_both": 10}
    ph = c["pruned_heads"]
    assert (ph["in_both"], ph["only_in_a"], ph["only_in_b"], ph["in_neither"], ph["agreement"]) == (1, 0, 1, 2, 0.75)
    assert (ph["per_layer_a"], ph["per_layer_b"]) == ([1, 0], [1, 1])
    assert pruned_heads_per_layer(b) == [1, 1]
    empty = torch.zeros(1, 2, 4, dtype=torch.bool)
    assert compare_masks(empty, empty)["jaccard_per_layer"] == [1.0]
    with pytest.raises(LeanKError, match="cannot compare masks of shapes") as e:
        compare_masks(a, torch.zeros(2, 2, 8, dtype=torch.bool))
    one_line(e)


def test_alpha_source_is_binarised_with_the_stage2_rule():
    alpha = torch.rand(3, 2, 16, generator=torch.Generator().manual_seed(0))
    src = as_source(alpha, sparsity=0.5, alignment=4)
    assert src.is_alpha and torch.equal(src.mask.kept, binarize(alpha, sparsity=0.5, alignment=4).kept)
    s = summary(src)
    assert s["input"]["kind"] == "alpha" and "kept_low_frequency_share" in s["frequency"]
    assert s["alpha"]["below_0.1"] + s["alpha"]["from_0.1_to_0.9"] + s["alpha"]["above_0.9"] == pytest.approx(1.0)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="leank")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(1)
    mask = binarize(torch.rand(3, 2, 16, generator=g), sparsity=0.7, alignment=4)
    mask.save(tmp_path / "a.safetensors")
    ChannelMask.random(3, 2, 16, sparsity=0.6, alignment=4, generator=g).save(tmp_path / "b.safetensors")
    save_file({"alpha": torch.rand(3, 2, 16, generator=g)}, str(tmp_path / "alpha.safetensors"))
    return tmp_path


def test_cli_writes_every_file(files):
    out = files / "out"
    assert cli(["analyze", str(files / "a.safetensors"), "--compare", str(files / "b.safetensors"),
                str(files / "alpha.safetensors"), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"heatmap.png", "frequency.png", "heads.png", "compare-b.png", "compare-alpha.png",
                     "analysis.json", "analysis.md"}  # no temporary files left behind
    for name in names - {"analysis.json", "analysis.md"}:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / "analysis.json").read_text())
    assert s == json.loads(json.dumps(summary(files / "a.safetensors", [files / "b.safetensors",
                                                                         files / "alpha.safetensors"])))
    assert [c["b"] for c in s["comparisons"]] == ["b", "alpha"]
    md = (out / "analysis.md").read_text()
    assert "![compare-b](compare-b.png)" in md and "Jaccard" in md

    out2 = files / "out2"
    assert cli(["analyze", str(files / "alpha.safetensors"), "--sparsity", "0.5", "--align", "8",
                "--out", str(out2)]) == 0
    assert (out2 / "alpha.png").is_file()
    s = json.loads((out2 / "analysis.json").read_text())
    assert s["input"]["kind"] == "alpha" and s["mask"]["alignment"] == 8 and "alpha" in s


def test_profiles_of_models_with_different_head_dims(files):
    path = plot_frequency_profiles([HAND, files / "a.safetensors"], files / "profiles.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_errors(files):
    def fails(argv: list[str], match: str) -> None:
        with pytest.raises(LeanKError, match=match) as e:
            cli(["analyze", *argv, "--out", str(files / "err")])
        one_line(e)

    (files / "junk.safetensors").write_bytes(b"not a safetensors file")
    fails([str(files / "junk.safetensors")], "not a valid .safetensors")
    fails([str(files / "missing.safetensors")], "file not found")
    save_file({"alpha": torch.full((2, 2, 8), 1.5)}, str(files / "big.safetensors"))
    fails([str(files / "big.safetensors")], r"outside \[0, 1\]")
    save_file({"alpha": torch.full((2, 2, 8), float("nan"))}, str(files / "nan.safetensors"))
    fails([str(files / "nan.safetensors")], r"outside \[0, 1\].*non-finite 32")
    save_file({"weights": torch.zeros(2)}, str(files / "other.safetensors"))
    fails([str(files / "other.safetensors")], "neither 'alpha' nor 'mask'")
    ChannelMask(torch.ones(2, 2, 8, dtype=torch.bool)).save(files / "small.safetensors")
    fails([str(files / "a.safetensors"), "--compare", str(files / "small.safetensors")], "shapes")
    fails([str(files / "alpha.safetensors"), "--sparsity", "1.5"], "sparsity")
    fails([str(files / "alpha.safetensors"), "--align", "5"], "alignment")
    assert not (files / "err").exists()  # every mistake is caught before anything is written
    (files / "file").write_text("")
    with pytest.raises(LeanKError, match="is a file"):
        cli(["analyze", str(files / "a.safetensors"), "--out", str(files / "file")])
    with pytest.raises(LeanKError, match="odd head_dim"):
        as_source(ChannelMask(torch.ones(1, 1, 7, dtype=torch.bool)))


def test_hybrid_mask_analysis(tmp_path):
    """A hybrid model's mask: the summary and plots name the model layers its rows compress."""
    from leank.analysis import from_mask, plot_comparison, plot_heads, summary

    gen = torch.Generator().manual_seed(0)
    a = ChannelMask.random(2, 2, 16, sparsity=0.5, alignment=4, generator=gen, layers=(1, 3))
    b = ChannelMask.random(2, 2, 16, sparsity=0.5, alignment=4, generator=gen, layers=(1, 3))
    assert summary(from_mask(a))["mask"]["model_layers"] == [1, 3]
    assert plot_heads(from_mask(a), tmp_path / "heads.png").stat().st_size > 0
    assert plot_comparison(from_mask(a), from_mask(b), tmp_path / "cmp.png").stat().st_size > 0
