"""leank.bench_tp (``leank bench --tensor-parallel``, ``benchmarks/tp_decode.py``) on the CPU: a
one-process run, then 2 gloo processes under torchrun (``tp_plan="auto"``) against it as the
reference; the CLI's options mapped onto it; and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import leank
from leank import bench_tp
from leank.cli import main as cli
from leank.errors import LeanKError

from .conftest import tiny_model
from .torchrun import ROOT, torchrun

SCRIPT = ROOT / "benchmarks" / "tp_decode.py"
gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                          reason="needs gloo")


@pytest.fixture
def model_and_mask(tmp_path):
    """A tiny Llama (hidden 64, 2 layers, 4 KV heads of 16 channels) saved with save_pretrained,
    and a random mask whose sink + recent (4 + 8) are far below the 96-token prompt."""
    model = tiny_model("llama", layers=2, kv_heads=4, groups=1, head_dim=16, vocab=101, seed=3, qk_gain=3.0)
    model.save_pretrained(tmp_path / "model")
    mask = leank.ChannelMask.random(2, 4, 16, sparsity=0.5, generator=torch.Generator().manual_seed(3),
                                    sink=4, recent=8)
    mask.save(tmp_path / "mask.safetensors")
    return tmp_path / "model", tmp_path / "mask.safetensors"


@pytest.mark.slow
@gloo
def test_two_processes_decode_the_reference_tokens_with_half_the_bytes_each(tmp_path, model_and_mask):
    model, mask = model_and_mask
    common = ["bench", "--model", str(model), "--mask", str(mask), "--lengths", "96", "--batches", "2", "--steps", "6",
              "--warmup", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    one = subprocess.run([sys.executable, "-m", "leank.cli", *common, "--tensor-parallel", "--out",
                          str(tmp_path / "tp1")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    # under torchrun, leank bench is tensor-parallel by itself (no --tensor-parallel)
    torchrun("-m", ["leank.cli", *common, "--out", str(tmp_path / "tp2"), "--reference",
                    str(tmp_path / "tp1" / "tokens.json")], tmp_path / "logs", timeout=180)

    ref = json.loads((tmp_path / "tp1" / "results.json").read_text())
    tp = json.loads((tmp_path / "tp2" / "results.json").read_text())
    assert ref["world_size"] == 1 and tp["world_size"] == 2 and tp["reference_same_weights"]
    assert tp["kv_heads_per_rank"] == [[0, 2], [2, 4]] and tp["eager"]
    assert (tmp_path / "tp2" / "results.md").read_text().count("| 2x96 |") == 2
    rows = {r["method"]: r for r in tp["rows"]}
    refs = {r["method"]: r for r in ref["rows"]}
    assert set(rows) == set(refs) == {"full", "leank-eager"}
    for method, row in rows.items():
        cmp = row["vs_reference"]
        assert row["ranks_agree"] and cmp["identical"], (method, cmp)
        assert cmp["steps_compared"] == 1 + 1 + 6 and cmp["max_abs_logit_diff"] < 1e-4, cmp
        assert len(row["per_rank"]) == 2 and all(len(r["step_ms"]) == 6 for r in row["per_rank"])
        # The dense bytes and LeanK's ideal bytes split exactly: each rank holds its KV heads' tokens.
        assert row["dense_bytes"] == refs[method]["dense_bytes"]
        assert row["ideal_bytes"] == refs[method]["ideal_bytes"]
    full, lean = rows["full"], rows["leank-eager"]
    assert [r["kv_bytes"] for r in full["per_rank"]] == [refs["full"]["kv_bytes"] // 2] * 2
    # LeanK per rank: about half (the two ranks' heads keep different channel counts).
    for r in lean["per_rank"]:
        assert 0.35 < r["kv_bytes"] / refs["leank-eager"]["kv_bytes"] < 0.65
    # Summed, LeanK allocates what one process does plus its per-process index tensors (lengths,
    # pads and tables each rank keeps for itself): every other part of the overhead splits exactly.
    ref_over = refs["leank-eager"]["per_rank"][0]["overhead_bytes"]
    index = sum(r["overhead_bytes"]["index"] for r in lean["per_rank"])
    assert lean["kv_bytes"] - refs["leank-eager"]["kv_bytes"] == index - ref_over["index"]
    assert 0 <= index - ref_over["index"] < 0.01 * refs["leank-eager"]["kv_bytes"]
    assert lean["kv_bytes"] < 0.9 * full["kv_bytes"]  # tokens went into the middle store
    tokens = json.loads((tmp_path / "tp2" / "tokens.json").read_text())
    ref_tokens = json.loads((tmp_path / "tp1" / "tokens.json").read_text())
    assert tokens["points"]["2x96"]["leank-eager"]["tokens"] == ref_tokens["points"]["2x96"]["leank-eager"]["tokens"]


def test_compare_reports_the_first_differing_step_and_the_logit_gap():
    compare = bench_tp.compare
    ref = {"tokens": [5, 6, 7], "top_logits": [[3.0, 1.0], [2.0, 1.9], [4.0, 0.0]]}
    mine = {"tokens": [5, 8, 7], "at_ref": [[3.0, 1.0], [1.9, 1.95], [0.0, 0.0]]}
    out = compare(mine, ref)
    assert out["identical"] is False and out["first_diff_step"] == 1 and out["steps_compared"] == 3
    assert out["ref_top2_gap_at_diff"] == pytest.approx(0.1) and out["logit_diff_at_diff"] == pytest.approx(0.1)
    assert out["max_abs_logit_diff"] == pytest.approx(0.1)  # steps after the first difference are not compared
    assert compare({"tokens": [5, 6], "at_ref": [[3.0, 1.0], [2.0, 1.9]]}, ref)["identical"] is True


@pytest.mark.parametrize("args, message", [
    (["--points", "8by32768"], "is not BATCHxPROMPT"),
    (["--points", "0x96"], "is not BATCHxPROMPT"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--reference", "/nonexistent/tokens.json"], "cannot read the reference tokens"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, model_and_mask, args, message):
    model, mask = model_and_mask
    with pytest.raises(LeanKError, match=message):
        bench_tp.main(["--model", str(model), "--mask", str(mask), "--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()


def test_leank_bench_options_become_points_and_eager_methods(tmp_path, model_and_mask):
    """``leank bench --tensor-parallel`` in one process: every length × batch is a point, the default
    methods are full and leank-eager, and the tokens are bench_tp's own for the same points."""
    model, mask = model_and_mask
    common = ["--model", str(model), "--mask", str(mask), "--steps", "2", "--warmup", "0", "--dtype", "bfloat16"]
    assert cli(["bench", "--tensor-parallel", *common, "--lengths", "40", "--batches", "1", "2",
                "--out", str(tmp_path / "cli")]) == 0
    direct = bench_tp.main([*common, "--points", "1x40", "2x40", "--out", str(tmp_path / "direct")])
    got = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert got["dtype"] == direct["dtype"] == "torch.bfloat16"
    assert got["environment"]["command"].startswith("leank bench")
    assert [(r["point"], r["method"]) for r in got["rows"]] == [
        ("1x40", "full"), ("1x40", "leank-eager"), ("2x40", "full"), ("2x40", "leank-eager")]
    assert [r["kv_bytes"] for r in got["rows"]] == [r["kv_bytes"] for r in direct["rows"]]
    tokens = json.loads((tmp_path / "cli" / "tokens.json").read_text())["points"]
    direct_tokens = json.loads((tmp_path / "direct" / "tokens.json").read_text())["points"]
    assert tokens == direct_tokens and set(tokens["2x40"]) == {"full", "leank-eager"}


@pytest.mark.parametrize("args, message", [
    (["--tensor-parallel", "--methods", "leank"], "under tensor parallelism the methods are full and leank-eager"),
    (["--tensor-parallel", "--budget-gib", "10"], "--budget-gib does not apply under tensor parallelism"),
    (["--tensor-parallel"], "under tensor parallelism --out is required"),
    (["--dtype", "float32"], "--reference, --dtype and --scratch belong to --tensor-parallel runs"),
    (["--tensor-parallel", "--lengths", "0", "--out", "o"], "--lengths must be positive integers, got [0]"),
])
def test_leank_bench_refuses_options_of_the_other_mode(args, message, capsys, model_and_mask):
    model, mask = model_and_mask
    assert cli(["bench", "--model", str(model), "--mask", str(mask), *args]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("world, message", [
    ("2", "WORLD_SIZE is 2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset: launch with torchrun"),
    ("two", "WORLD_SIZE must be an integer (torchrun sets it), got 'two'"),
])
def test_a_world_size_without_torchrun_is_one_error_line(world, message, model_and_mask, monkeypatch, capsys):
    model, mask = model_and_mask
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", world)
    assert cli(["bench", "--model", str(model), "--mask", str(mask), "--out", "o"]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_reference_that_is_not_a_tokens_file_is_refused(tmp_path, model_and_mask):
    model, mask = model_and_mask
    (tmp_path / "results.json").write_text(json.dumps({"points": {"2x96": {"full": {"step_ms": [1.0]}}}}))
    with pytest.raises(LeanKError, match="expected the tokens.json of a run of this benchmark"):
        bench_tp.main(["--model", str(model), "--mask", str(mask), "--out", str(tmp_path / "out"),
                       "--reference", str(tmp_path / "results.json")])


def test_kv_heads_must_split_over_the_processes(tmp_path, model_and_mask, monkeypatch):
    model, mask = model_and_mask
    monkeypatch.setenv("WORLD_SIZE", "3")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29599")):
        monkeypatch.setenv(key, value)
    with pytest.raises(LeanKError, match="4 KV heads / 4 attention heads do not split evenly over 3"):
        bench_tp.main(["--model", str(model), "--mask", str(mask), "--out", str(tmp_path / "out")])


def test_a_shape_model_is_saved_once_and_reused(tmp_path, model_and_mask, monkeypatch):
    """A SHAPES name: built with the seed, saved under --scratch with its marker, then loaded;
    a second run loads the saved copy without writing it again."""
    _, mask = model_and_mask
    monkeypatch.setitem(leank.models.SHAPES, "tiny-shape", ("LlamaConfig", dict(
        vocab_size=101, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, tie_word_embeddings=False)))
    args = ["--model", "tiny-shape", "--mask", str(mask), "--points", "1x40", "--steps", "2", "--warmup", "0",
            "--scratch", str(tmp_path / "scratch"), "--methods", "leank-eager"]
    first = bench_tp.main([*args, "--out", str(tmp_path / "a")])
    saved = tmp_path / "scratch" / "tiny-shape-float32-seed0"
    weights = {p.name: p.stat().st_mtime_ns for p in saved.iterdir()}
    assert "leank-shape.json" in weights and "config.json" in weights
    second = bench_tp.main([*args, "--out", str(tmp_path / "b"), "--reference", str(tmp_path / "a" / "tokens.json")])
    assert {p.name: p.stat().st_mtime_ns for p in saved.iterdir()} == weights
    assert first["weights"] == second["weights"] and second["reference_same_weights"]
    assert second["rows"][0]["vs_reference"]["identical"]


@pytest.mark.slow
def test_an_error_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    out = subprocess.run([sys.executable, str(SCRIPT), "--points", "8x", "--out", str(tmp_path / "o")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("tp_decode.py: error: point '8x' is not BATCHxPROMPT with positive numbers, "
                                  "e.g. 8x32768")
