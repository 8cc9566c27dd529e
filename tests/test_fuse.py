"""Fused projections (leank.fuse): the same model function as the unfused transformers code (the
independent reference), no lasting memory, free to undo, and one GEMM per group once compiled."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

import leank
from leank.fuse import SharedProjection, fuse_projections, is_fused, unfuse_projections

from .conftest import ARCHS, BASIC_ARCHS, tiny_model


@pytest.mark.parametrize("arch", [a for a in BASIC_ARCHS if a in ARCHS])
def test_fused_model_decodes_like_the_original(arch):
    """Greedy tokens and logits of a LeanK decode (tokens moving into the middle store) equal the
    unfused model's; parameters keep their count and share one storage per group; unfusing gives the
    original modules back, exact."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model(arch, layers=2, kv_heads=2, groups=2, head_dim=16, qk_gain=3.0)
    leank.enable(model)
    mask = leank.ChannelMask.random(2, 2, 16, sparsity=0.5, alignment=4, generator=gen)
    ids = torch.randint(3, model.config.vocab_size, (2, 30), generator=gen)
    numel = sum(p.numel() for p in model.parameters())
    attn = model.model.layers[0].self_attn
    originals = attn.q_proj, attn.k_proj, attn.v_proj
    params = [m.weight for m in originals]
    before = [p.detach().clone() for p in params]
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)  # a mix of trainable and frozen

    def decode():
        cache = leank.LeanKCache(model, mask, sink=3, recent=5, max_length=60)
        out = model(input_ids=ids, **leank.cache_kwargs(cache))
        logits, token = [out.logits], out.logits[:, -1:].argmax(-1)
        for _ in range(10):
            out = model(input_ids=token, **leank.cache_kwargs(cache))
            logits.append(out.logits)
            token = out.logits[:, -1:].argmax(-1)
        assert cache.layers[0].middle_length() > 0
        return torch.cat(logits, 1)

    with torch.no_grad():
        reference = decode()
        assert fuse_projections(model) == 2 * 2  # q/k/v and gate/up in each of 2 layers
        assert fuse_projections(model) == 0 and is_fused(model)  # idempotent
        assert sum(p.numel() for p in model.parameters()) == numel  # the fused copies only: nothing twice
        assert all(p.numel() == 0 for p in params)  # the originals gave their data up
        fused = decode()
        assert all(s._memo is None for s in model.modules() if isinstance(s, SharedProjection))
        assert unfuse_projections(model) == 4 and not is_fused(model)
        assert (attn.q_proj, attn.k_proj, attn.v_proj) == originals
        assert all(m.weight is p and torch.equal(p, b) for m, p, b in zip(originals, params, before, strict=True))
        assert [p.requires_grad for p in model.parameters()] == [p is not model.model.layers[1].mlp.up_proj.weight
                                                                 for p in model.parameters()]
        again = decode()
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.argmax(-1), reference.argmax(-1))
    assert torch.equal(again, reference)


def test_moved_while_fused_then_unfused():
    """Cast (or moved) while fused: the restored weights are the fused ones as they are now, and no
    parameter is left behind in the old dtype."""
    model = tiny_model("qwen2", layers=2, kv_heads=2, groups=2, head_dim=16)
    expected = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    fuse_projections(model)
    model.double()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    unfuse_projections(model)
    got = dict(model.named_parameters())
    assert got.keys() == expected.keys()
    for name, p in got.items():
        assert p.dtype == torch.float64 and torch.equal(p.detach(), expected[name]), name


def test_memo_dropped_when_the_forward_raises():
    """A forward that fails between the parts' reads (here: after q, before k) keeps no product alive."""
    model = tiny_model("llama", layers=1, kv_heads=2, groups=2, head_dim=16)
    fuse_projections(model)
    attn = model.model.layers[0].self_attn
    real = attn.k_proj.forward
    attn.k_proj.forward = lambda x: (_ for _ in ()).throw(RuntimeError("out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"), torch.no_grad():
        model(input_ids=torch.randint(3, 97, (1, 9)))
    assert attn.leank_qkv_proj._memo is None
    attn.k_proj.forward = real


def test_parts_called_with_different_inputs_stay_correct():
    """A part given another input than its siblings computes its own product (no stale slice)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    lins = [torch.nn.Linear(8, n, bias=True) for n in (4, 6, 2)]
    holder = torch.nn.Module()
    for name, m in zip(("q_proj", "k_proj", "v_proj"), lins, strict=True):
        setattr(holder, name, m)
    x, y = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    with torch.no_grad():
        expected = lins[0](x), lins[1](y), lins[2](x), lins[0](y)
        assert fuse_projections(holder) == 1
        got = holder.q_proj(x), holder.k_proj(y), holder.v_proj(x), holder.q_proj(y)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_unfusable_groups_are_left_alone():
    """Mixed bias, a subclass of Linear (quantised layers are), other input sizes or dtypes, or a hooked
    module: not fused."""
    class Custom(torch.nn.Linear):
        pass

    cases = [
        [torch.nn.Linear(8, 4), torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(8, 4)],
        [torch.nn.Linear(8, 4), Custom(8, 4), torch.nn.Linear(8, 4)],
        [torch.nn.Linear(8, 4), torch.nn.Linear(6, 4), torch.nn.Linear(8, 4)],
        [torch.nn.Linear(8, 4), torch.nn.Linear(8, 4).double(), torch.nn.Linear(8, 4)],
    ]
    hooked = [torch.nn.Linear(8, 4) for _ in range(3)]
    hooked[1].register_forward_hook(lambda *a: None)
    for lins in [*cases, hooked]:
        holder = torch.nn.Module()
        for name, m in zip(("q_proj", "k_proj", "v_proj"), lins, strict=True):
            setattr(holder, name, m)
        assert fuse_projections(holder) == 0
        assert holder.q_proj is lins[0]


def mm_widths(source: str) -> list[int]:
    """Output widths of the weight products in inductor's CPU code for one token (extern mm calls
    whose second operand is a weight ``[in, out]`` read transposed)."""
    weight = r"reinterpret_tensor\(\w+, \(\d+, (\d+)\), \(1, \d+\), 0\)"
    return [int(w) for w in re.findall(r"extern_kernels\.mm\(.*" + weight + r", out=", source)]


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor on CPU needs a C++ compiler")
def test_compiled_fused_step_has_one_gemm_per_group():
    """Inductor (real code generation on the CPU) compiles the fused LeanK decode step with q/k/v as
    one GEMM and gate/up as one, no graph break, and the greedy tokens equal the unfused eager model's."""
    from torch._inductor.utils import run_and_get_code

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=2, kv_heads=2, groups=2, head_dim=16, qk_gain=3.0).eval()
    mask = leank.ChannelMask.random(2, 2, 16, sparsity=0.5, alignment=4, generator=gen)
    leank.enable(model)
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=gen)
    cfg = model.config
    hidden, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    tokens, widths = [], None
    torch._dynamo.reset()
    with torch.inference_mode():
        for compiled in (False, True):
            if compiled:
                fuse_projections(model)
            cache = leank.LeanKCache(model, mask, sink=3, recent=5, max_length=60)
            kw = leank.cache_kwargs(cache)
            token = model(input_ids=ids, logits_to_keep=1, **kw).logits[:, -1].argmax(-1, keepdim=True)
            forward = torch.compile(model.forward, fullgraph=True) if compiled else model.forward
            seq = []
            for step in range(12):
                if compiled and step == 0:
                    out, code = run_and_get_code(forward, input_ids=token, logits_to_keep=1, **kw)
                    widths = mm_widths("\n".join(code))
                else:
                    out = forward(input_ids=token, logits_to_keep=1, **kw)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                seq.append(int(token))
            tokens.append(seq)
            assert cache.layers[0].middle_length() > 0
    torch._dynamo.reset()
    assert tokens[0] == tokens[1]
    layer = [hidden + 2 * kv, hidden, 2 * cfg.intermediate_size, hidden]
    assert widths == layer * cfg.num_hidden_layers + [cfg.vocab_size], widths
