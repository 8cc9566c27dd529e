"""With an all-kept mask, LeanK generation is token-identical to DynamicCache + SDPA."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import leank
from leank.masks import hybrid_layers, kv_shape

from .conftest import left_padded, tiny_model


def generate_both(model, ids, attention_mask, *, sink=3, recent=5, max_length=None, **gen_kwargs):
    """The model's own default cache and attention (SDPA, or eager where that is its default)
    against LeanK with an all-kept mask, from the same seed."""
    kwargs = dict(input_ids=ids, attention_mask=attention_mask, pad_token_id=0, **gen_kwargs)
    default_attn = model.config._attn_implementation
    seed = torch.seed()
    torch.manual_seed(seed)
    dense = model.generate(**kwargs, **leank.cache_kwargs(DynamicCache(config=model.config)))
    leank.enable(model)
    mask = leank.ChannelMask.full(*kv_shape(model.config), layers=hybrid_layers(model.config))
    cache = leank.LeanKCache(model, mask, sink=sink, recent=recent, max_length=max_length)
    torch.manual_seed(seed)
    ours = model.generate(**kwargs, **leank.cache_kwargs(cache))
    model.set_attn_implementation(default_attn)
    return dense, ours, cache


def test_greedy_32_tokens(arch):
    model = tiny_model(arch, qk_gain=3.0, head_dim=96 if arch == "phi3" else 16)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids, am = left_padded([45], 97, gen)
    dense, ours, cache = generate_both(model, ids, am, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(dense, ours)
    assert cache.get_seq_length() == 45 + 31  # the last token is sampled, never fed back
    assert cache.leank_layers()[0].middle_length() > 0


@pytest.mark.parametrize("static", [False, True])
def test_left_padded_batch_of_3(arch, static):
    model = tiny_model(arch, qk_gain=3.0, head_dim=96 if arch == "phi3" else 16)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids, am = left_padded([30, 17, 4], 97, gen)
    dense, ours, _ = generate_both(model, ids, am, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                   max_length=30 + 32 if static else None)
    assert torch.equal(dense, ours)


@pytest.mark.parametrize("static", [False, True])
def test_beam_search_2(arch, static):
    model = tiny_model(arch, qk_gain=3.0, head_dim=96 if arch == "phi3" else 16)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids, am = left_padded([25, 19], 97, gen)
    dense, ours, _ = generate_both(
        model, ids, am, max_new_tokens=24, min_new_tokens=24, do_sample=False, num_beams=2,
        max_length=25 + 24 if static else None,
    )
    assert torch.equal(dense, ours)


def test_sampling_same_seed():
    model = tiny_model("llama", qk_gain=3.0)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids, am = left_padded([20, 12], 97, gen)
    dense, ours, _ = generate_both(
        model, ids, am, max_new_tokens=20, min_new_tokens=20, do_sample=True, top_k=0, temperature=1.0
    )
    assert torch.equal(dense, ours)


@pytest.mark.parametrize("sink,recent", [(8, 16), (0, 0), (40, 3)])
def test_prompt_shorter_than_sink_plus_recent_full_mask(sink, recent):
    model = tiny_model("llama", qk_gain=3.0)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids, am = left_padded([5, 2, 9], 97, gen)
    dense, ours, _ = generate_both(
        model, ids, am, sink=sink, recent=recent, max_new_tokens=30, min_new_tokens=30, do_sample=False
    )
    assert torch.equal(dense, ours)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding layers (transformers 5.17's reset zeroes)
def test_cache_reset_and_reuse(static, arch):
    model = tiny_model(arch, qk_gain=3.0)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids, am = left_padded([20, 9], 97, gen)
    leank.enable(model)
    mask = leank.ChannelMask.random(*kv_shape(model.config), sparsity=0.5, alignment=4, generator=gen,
                                    layers=hybrid_layers(model.config))
    cache = leank.LeanKCache(model, mask, sink=2, recent=4, max_length=32 if static else None)
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=12, do_sample=False, pad_token_id=0)
    first = model.generate(**kw, **leank.cache_kwargs(cache))
    layer = cache.leank_layers()[0]
    buffers = [t.data_ptr() for t in (layer.mid_k, layer.ring_k, layer.seen)]
    cache.reset()
    assert cache.get_seq_length() == 0
    again = model.generate(**kw, **leank.cache_kwargs(cache))
    assert torch.equal(first, again)
    if static:  # the same buffers (a compiled step captured with their addresses stays valid)
        assert buffers == [t.data_ptr() for t in (layer.mid_k, layer.ring_k, layer.seen)]
