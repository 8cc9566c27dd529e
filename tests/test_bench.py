"""`leank bench` pieces that run without a GPU: input errors and the summary arithmetic."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

import leank
from leank import bench
from leank.cli import main
from leank.errors import LeanKError

from .conftest import tiny_model


def test_bench_refuses_cleanly_without_cuda_or_with_bad_input(capsys):
    if not torch.cuda.is_available():
        assert main(["bench", "--model", "smollm2-135m"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["bench", "--batches", "0"]) == 2
    assert "--batches must be positive" in capsys.readouterr().err


def test_summary_ratios_from_rows():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    full, compiled, lean, fused, compiled_fused = (torch.rand(5, generator=gen) * 100 + 1).tolist()
    floor = float(torch.rand(1, generator=gen)) + 0.1
    rows = [
        {"method": "full", "batch": 7, "prompt": 512, "tokens_per_s": full, "step_ms_median": 7e3 / full,
         "floor_ms": 2 * floor},
        {"method": "full-compiled", "batch": 7, "prompt": 512, "tokens_per_s": compiled},
        {"method": "leank", "batch": 7, "prompt": 512, "tokens_per_s": lean, "step_ms_median": 7e3 / lean,
         "floor_ms": floor},
        {"method": "leank", "batch": 9, "prompt": 512, "tokens_per_s": 1.0, "note": "max batch"},  # not a grid point
        {"method": "quantized-int4", "batch": 7, "prompt": 512, "tokens_per_s": full / 3},
        {"method": "leank-fused", "batch": 7, "prompt": 512, "tokens_per_s": fused, "step_ms_median": 7e3 / fused,
         "floor_ms": floor},
        {"method": "full-compiled-fused", "batch": 7, "prompt": 512, "tokens_per_s": compiled_fused},
    ]
    capacity = [{"method": "full", "prompt": 512, "cached_tokens": 3 * 548},
                {"method": "leank", "prompt": 512, "cached_tokens": 5 * 548}]
    summary = bench.summarize(rows, capacity)
    ratios = summary["ratios"]["512x7"]
    best_dense = max(full, compiled, compiled_fused)  # a fused dense method is dense
    assert abs(ratios["leank_over_best_dense"] - lean / best_dense) < 1e-12
    assert abs(ratios["leank-fused_over_best_dense"] - fused / best_dense) < 1e-12
    assert abs(ratios["leank-fused_step_over_own_floor"] - 7e3 / fused / floor) < 1e-9
    assert abs(ratios["leank_step_over_own_floor"] - 7e3 / lean / floor) < 1e-9
    assert abs(ratios["leank_step_over_dense_floor"] - 7e3 / lean / (2 * floor)) < 1e-9
    assert abs(ratios["leank_over_quantized_int4"] - lean / (full / 3)) < 1e-9
    assert "512x9" not in summary["ratios"]
    assert abs(summary["cached_tokens_at_budget"][512]["leank_over_full"] - 5 / 3) < 1e-12


def test_step_read_bytes_from_the_definition():
    """Weights one step reads (only B rows of an untied input embedding) and dense KV bytes."""
    model = tiny_model("llama", layers=2, kv_heads=2, groups=2, head_dim=16, vocab=97)
    params = sum(p.numel() for p in model.parameters()) * 4
    assert bench.weight_bytes(model, 3) == params - 97 * 64 * 4 + 3 * 64 * 4
    assert bench.kv_bytes_needed("full", model, None, 3, 50) == 2 * 3 * 50 * 2 * 16 * 2 * 4


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: sliding layers, soft-capping (eager dense)
def test_every_method_runs_on_cpu(arch):
    """The measurement loop of each method (compiled ones through transformers' compile call,
    here with dynamo's eager backend on the CPU): a row with consistent figures, the cache
    repeated to 3 rows."""
    from leank.masks import hybrid_layers, kv_shape

    model = tiny_model(arch, layers=2, kv_heads=2, groups=2, head_dim=16, vocab=97)
    mask = leank.ChannelMask.random(*kv_shape(model.config), sparsity=0.5, alignment=4,
                                    generator=torch.Generator().manual_seed(0), layers=hybrid_layers(model.config))
    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True
    for method in (m for m in bench.METHODS if m != "quantized-int4"):  # batch 1 only: below
        row = bench.run_one(model, method, mask, batch=3, length=40, steps=4, warmup=3, copy_bw=1e10,
                            compile_config=config)
        assert row["method"] == method and row["batch"] == 3
        assert abs(row["tokens_per_s"] - 3e3 / row["step_ms_median"]) < 1e-6
        assert abs(row["mbu"] - row["floor_ms"] / row["step_ms_median"]) < 1e-9
        assert row["kv_gib"] > 0


def test_full_flash_leaves_cudnn_out_of_every_forward(monkeypatch):
    """``full-flash``: the prefill and every decode step run with SDPA's cuDNN backend disabled (and
    only then: ``full`` keeps torch's default), with the same greedy tokens as ``full`` on the CPU."""
    import torch.nn.functional as F

    model = tiny_model("llama", layers=2, kv_heads=2, groups=2, head_dim=16, vocab=97)
    seen, tokens = {}, {}
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.setdefault(method, set()).add(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    argmax = torch.Tensor.argmax

    def record_token(t, *a, **k):
        out = argmax(t, *a, **k)
        tokens.setdefault(method, []).append(out.clone())
        return out

    monkeypatch.setattr(torch.Tensor, "argmax", record_token)
    for method in ("full", "full-flash"):
        bench.run_one(model, method, None, batch=2, length=30, steps=5, warmup=2)
    assert seen == {"full": {True}, "full-flash": {False}}, seen
    assert len(tokens["full"]) == 8
    assert all(torch.equal(a, b) for a, b in zip(tokens["full"], tokens["full-flash"], strict=True))
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored afterwards


def test_quantized_cache_runs_at_batch_one_and_refuses_more_before_any_work(monkeypatch):
    """``quantized-int4``: transformers' QuantizedCache (quanto) at batch 1, its bytes those the
    evaluation counts; batch 3 refused before the prefill (the packed codes cannot be repeated)."""
    model = tiny_model("llama", layers=2, kv_heads=2, groups=2, head_dim=16, vocab=97)
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(LeanKError, match="quantized-int4 runs at batch 1 only"):
        bench.run_one(model, "quantized-int4", None, batch=3, length=40, steps=4, warmup=3)
    assert not calls
    monkeypatch.undo()
    pytest.importorskip("optimum.quanto")
    # 3 + 125 steps: the residual reaches 128 tokens at the last step and is quantised (left empty)
    for warmup, steps in ((3, 4), (3, 125)):
        row = bench.run_one(model, "quantized-int4", None, batch=1, length=200, steps=steps, warmup=warmup,
                            copy_bw=1e10)
        tokens = 200 + warmup + steps
        dense = 2 * 2 * 2 * tokens * 16 * 4  # layers × K/V × KV heads × tokens × head_dim × fp32 bytes
        held = row["kv_gib"] * 2**30
        # per fp32 value (4 bytes): half a byte of int4 code + an fp32 scale and shift per group of 64
        quantised = (0.5 + 8 / 64) / 4
        if steps == 125:  # every token quantised, the residual empty
            assert held == pytest.approx(quantised * dense, rel=1e-12)
        else:  # the 200 prompt tokens quantised, the 7 decoded ones in full
            assert held == pytest.approx(quantised * dense * 200 / tokens + dense * 7 / tokens, rel=1e-12)
        assert row["batch"] == 1
        assert row["step_read_gb"] * 1e9 == pytest.approx(bench.weight_bytes(model, 1) + held, rel=1e-12)


def test_measure_refuses_a_quantized_cache_without_quanto_before_loading_and_keeps_going_past_batch_8(monkeypatch):
    """In ``measure``: no model load when optimum-quanto is missing; a batch-8 quantized-int4 point
    becomes an error row (no prefill) and the other methods still run."""
    model = tiny_model("llama", layers=2, kv_heads=2, groups=2, head_dim=16, vocab=97)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 1e10)
    monkeypatch.setattr(bench, "_guarded", lambda fn, budget: fn())

    def missing():
        raise LeanKError("needs optimum-quanto")

    def no_load(*a):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(bench, "check_quantized_cache", missing)
    monkeypatch.setattr(bench, "load", no_load)
    with pytest.raises(LeanKError, match="needs optimum-quanto"):
        bench.measure("tiny", methods=["full", "quantized-int4"], lengths=[40], batches=[8])
    monkeypatch.setattr(bench, "check_quantized_cache", lambda: None)
    monkeypatch.setattr(bench, "load", lambda *a: (model, None))
    made, real = [], bench.make_cache
    monkeypatch.setattr(bench, "make_cache", lambda method, *a: made.append(method) or real(method, *a))
    result = bench.measure("tiny", methods=["full", "quantized-int4"], lengths=[40], batches=[8], steps=2, warmup=1,
                           progress=lambda line: None)
    rows = {r["method"]: r for r in result["rows"]}
    assert "quantized-int4 runs at batch 1 only" in rows["quantized-int4"]["error"]
    assert rows["full"]["batch"] == 8 and rows["full"]["tokens_per_s"] > 0
    assert made == ["full"]  # quantized-int4 refused before its cache (and its prefill) existed


def test_shape_models_have_the_published_sizes():
    """The random-weight shapes match the real models' published parameter counts (Llama-3.1-8B:
    8.03 B; Qwen2.5-7B: 7.61 B, with QKV bias) and KV layout; built on the meta device (no memory)."""
    from leank.masks import kv_shape
    from leank.models import shape_model

    expect = {"llama3.1-8b-shape": (8.03e9, (32, 8, 128)), "qwen2.5-7b-shape": (7.61e9, (28, 4, 128))}
    for name, (params, kv) in expect.items():
        model = shape_model(name, device="meta", dtype=torch.bfloat16)
        assert abs(sum(p.numel() for p in model.parameters()) - params) < 0.01e9, name
        assert tuple(kv_shape(model.config)) == kv and model.dtype == torch.bfloat16
    assert shape_model("qwen2.5-7b-shape", device="meta").model.layers[0].self_attn.q_proj.bias is not None


def test_fused_methods_run_on_the_fused_model(monkeypatch):
    """``*-fused`` rows run with the projections fused and every other row unfused, under the base
    method's name for the cache and the row under its own."""
    from leank.fuse import is_fused

    model = tiny_model("llama", layers=2, kv_heads=2, groups=2, head_dim=16, vocab=97)
    seen = []
    monkeypatch.setattr(bench, "_run_one", lambda m, method, mask, **kw: seen.append((method, is_fused(m))) or {})
    for method in ("leank-fused", "leank", "full-compiled-fused", "full-flash"):
        assert bench.run_one(model, method, None, batch=1, length=8, steps=1, warmup=3)["method"] == method
    assert seen == [("leank", True), ("leank", False), ("full-compiled", True), ("full-flash", False)]


def test_every_leank_cache_method_but_the_eager_one_is_compiled():
    """A LeanK method missing from COMPILED would be timed eager, silently."""
    leank_methods = {m for m in bench.METHODS if m.startswith("leank")}
    assert leank_methods - set(bench.COMPILED) == {"leank-eager"}
