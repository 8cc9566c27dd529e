"""The static decode step under torch.compile, on the CPU: transformers' own auto-compile
path in ``generate()`` (the one it takes on CUDA with CUDA graphs; here forced on the CPU
with dynamo's ``eager`` backend, so the test checks tracing, not code generation) gives the
same tokens as eager decoding, with one graph for every decode step (no recompilation as
the sequence grows, no graph break)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

import leank

from .conftest import left_padded, tiny_model


def cpu_compile_config() -> CompileConfig:
    config = CompileConfig(backend="eager", fullgraph=True, dynamic=False)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    return config


@pytest.mark.parametrize("sampling, quant", [(False, None), (True, None),
                                             (False, leank.KVQuant(4, 8, symmetric=True, rotate=True))],
                         ids=["greedy", "sampling", "greedy-int4g8sr"])
def test_generate_compiled_equals_eager(sampling, quant):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=2, kv_heads=2, groups=2, head_dim=16, qk_gain=3.0)
    mask = leank.ChannelMask.random(2, 2, 16, sparsity=0.5, alignment=4, generator=gen)
    leank.enable(model)
    ids, am = left_padded([30, 20, 3], 97, gen)  # one prompt shorter than sink + recent
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=25, min_new_tokens=25, pad_token_id=0,
              do_sample=sampling, top_k=0)
    seed = torch.seed()
    outs = []
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        cache = leank.LeanKCache(model, mask, sink=3, recent=5, max_length=ids.shape[1] + 25, quant=quant)
        assert cache.is_compileable
        torch.manual_seed(seed)
        mode = dict(compile_config=cpu_compile_config()) if compiled else dict(disable_compile=True)
        outs.append(model.generate(**kw, **mode, **leank.cache_kwargs(cache)))
        # tokens moved into the middle store on the way
        assert cache.layers[0].middle_length() > 0
        assert (cache.layers[0].rotation is not None) == (quant is not None)  # a mask keeping 4/8/12 channels
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert torch.equal(outs[0], outs[1])


def test_growing_cache_is_not_compileable():
    model = tiny_model("llama")
    leank.enable(model)
    mask = leank.ChannelMask.full(2, 2, 16)
    assert not leank.LeanKCache(model, mask).is_compileable
    with pytest.raises(leank.LeanKError, match="max_length must be a positive"):
        leank.LeanKCache(model, mask, max_length=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_on_cuda_takes_the_cuda_graph_path(num_beams):
    """On CUDA, generate() compiles the decode step of a static LeanK cache by itself
    (inductor, CUDA graphs, the Triton kernel as an opaque op): same tokens as eager."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=2, kv_heads=2, groups=2, head_dim=64, qk_gain=3.0).cuda()
    mask = leank.ChannelMask.random(2, 2, 64, sparsity=0.5, alignment=16, generator=gen)
    leank.enable(model)
    ids, am = left_padded([60, 41, 5], 97, gen)
    kw = dict(input_ids=ids.cuda(), attention_mask=am.cuda(), max_new_tokens=40, min_new_tokens=40,
              pad_token_id=0, do_sample=False, num_beams=num_beams)
    outs = []
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        cache = leank.LeanKCache(model, mask, sink=4, recent=8, max_length=ids.shape[1] + 40)
        mode = {} if compiled else dict(disable_compile=True)
        outs.append(model.generate(**kw, **mode, **leank.cache_kwargs(cache)))
    if num_beams == 1:  # (transformers 5.17 compiles greedy/sample decoding, not beam search)
        assert counters["stats"]["unique_graphs"] >= 1, "generate() did not compile the decode step"
    assert torch.equal(outs[0], outs[1])


def test_eager_steps_after_compiled_ones_still_check_max_length():
    """Compiled steps cannot keep the host's token count; the next eager step re-reads it, so
    going past max_length after a compiled generate() is still refused."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=2, kv_heads=2, groups=2, head_dim=16, qk_gain=3.0)
    leank.enable(model)
    ids = torch.randint(3, 97, (1, 20), generator=gen)
    cache = leank.LeanKCache(model, leank.ChannelMask.full(2, 2, 16), sink=3, recent=5, max_length=45)
    kw = dict(do_sample=False, pad_token_id=0, **leank.cache_kwargs(cache))
    torch._dynamo.reset()
    out = model.generate(input_ids=ids, max_new_tokens=25, min_new_tokens=25, compile_config=cpu_compile_config(),
                         **kw)
    assert int(cache.get_seq_length()) == 44
    with pytest.raises(leank.LeanKError, match="built for max_length=45"):
        model.generate(input_ids=out, attention_mask=torch.ones_like(out), max_new_tokens=3, min_new_tokens=3,
                       disable_compile=True, **kw)
