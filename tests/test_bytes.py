"""KV-cache byte accounting: what is allocated against the ideal figure and its documented overhead."""

from __future__ import annotations

import pytest
import torch

import leank

from .conftest import left_padded, tiny_model


def prefill_and_decode(model, mask, ids, am, steps, **cache_kw):
    leank.enable(model)
    cache = leank.LeanKCache(model, mask, **cache_kw)
    model.generate(input_ids=ids, attention_mask=am, max_new_tokens=steps, min_new_tokens=steps,
                   do_sample=False, pad_token_id=0, **leank.cache_kwargs(cache))
    return cache


def independent_ideal(mask, lengths, seen_pad, sink, recent, head_dim, elem):
    """Ideal bytes from the definition, per row: sink + recent tokens full, the rest compressed."""
    counts = mask.kept.sum(-1)  # [L, H]
    full_token = 2 * mask.num_kv_heads * head_dim
    total = 0
    for n in lengths:
        full = min(sink, n) + min(recent, max(0, n - sink))
        for layer in range(mask.num_layers):
            middle_token = int(counts[layer].sum()) + head_dim * int((counts[layer] > 0).sum())
            total += full * full_token + (n - full) * middle_token
    return total * elem


def allocated_bytes(cache) -> int:
    """Bytes of every tensor the cache's layers hold, listed here independently."""
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in [layer.ring_k, layer.ring_v, layer.sink_k, layer.sink_v, layer.mid_k, layer.mid_v, layer.pads,
                  layer.seen, layer.c0, *layer.tables, layer.k_src, layer.k_head_off, layer.k_col, layer.k_step,
                  layer.v_src, layer.v_head_off, layer.v_col, layer.k_base, layer.v_base]
    )


def index_bytes(cache) -> int:
    return cache.overhead_nbytes()["index"]


def test_measured_bytes_within_ideal_plus_documented_overhead():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=3, kv_heads=4, groups=1, head_dim=32)
    mask = leank.ChannelMask.random(3, 4, 32, sparsity=0.7, alignment=8, generator=gen)
    ids, am = left_padded([200, 150, 181], 97, gen)
    S, R, B = 8, 16, 3
    full_token = 2 * 4 * 32 * 4
    for steps in (1, 9, 40):
        cache = prefill_and_decode(model, mask, ids, am, steps, sink=S, recent=R)
        seen = int(cache.get_seq_length())
        lengths = [seen - int((am[b] == 0).sum()) for b in range(B)]
        ideal = independent_ideal(mask, lengths, None, S, R, 32, 4)
        assert cache.ideal_nbytes() == ideal
        allocated = allocated_bytes(cache)
        assert cache.nbytes() == allocated
        overhead = cache.overhead_nbytes()
        assert allocated == ideal + sum(overhead.values()), (allocated, ideal, overhead)
        assert 0 <= overhead["window"] <= 3 * B * (S + R + 2) * full_token  # the documented bound
        assert allocated < cache.dense_nbytes()


@pytest.mark.parametrize("prompt, new", [(4, 5), (1, 1), (30, 3), (60, 200)])
def test_never_more_than_dense_plus_the_documented_constant(prompt, new):
    """Whatever the length (here shorter and longer than sink + recent), a cache without
    max_length holds at most the dense cache's bytes plus S + R + 2 full tokens per row per
    layer and its index tables (issue 11: a 4-token prompt once took 14x the dense bytes)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=2, kv_heads=2, groups=2, head_dim=16)
    mask = leank.ChannelMask.full(2, 2, 16)  # the worst case for the middle store: nothing pruned
    ids, am = left_padded([prompt, max(1, prompt // 2)], 97, gen)
    S, R = 8, 16
    cache = prefill_and_decode(model, mask, ids, am, new, sink=S, recent=R)
    full_token = 2 * 2 * 16 * 4
    bound = cache.dense_nbytes() + 2 * 2 * (S + R + 2) * full_token + index_bytes(cache)
    assert cache.nbytes() <= bound, (cache.nbytes(), cache.dense_nbytes(), cache.overhead_nbytes())


def test_static_cache_allocates_the_ideal_for_max_length_plus_overhead():
    """With max_length, everything is allocated at the prompt: the ideal bytes at max_length
    plus scratch slots, the ring's extra token, padding slots and index tables."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=2, kv_heads=4, groups=1, head_dim=32)
    mask = leank.ChannelMask.random(2, 4, 32, sparsity=0.7, alignment=8, generator=gen)
    ids, am = left_padded([100, 100], 97, gen)
    S, R, max_length = 8, 16, 300
    leank.enable(model)
    cache = leank.LeanKCache(model, mask, sink=S, recent=R, max_length=max_length)
    kw = dict(do_sample=False, pad_token_id=0, **leank.cache_kwargs(cache))
    first = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=5, min_new_tokens=5, **kw)
    before = cache.nbytes()
    model.generate(input_ids=first, attention_mask=torch.cat([am, torch.ones_like(first[:, 100:])], 1),
                   max_new_tokens=150, min_new_tokens=150, **kw)
    assert int(cache.get_seq_length()) == 254
    assert cache.nbytes() == before, "a static cache allocates nothing after the prompt"
    ideal_at_max = independent_ideal(mask, [max_length] * 2, None, S, R, 32, 4)
    full_token = 2 * 4 * 32 * 4
    scratch_and_ring = 2 * 2 * (2 * full_token + full_token)  # per layer and row: 2 scratch + the ring's extra
    assert cache.nbytes() <= ideal_at_max + scratch_and_ring + index_bytes(cache)


def test_fully_pruned_heads_store_no_middle_values():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=1, kv_heads=4, groups=1, head_dim=16)
    kept = torch.zeros(1, 4, 16, dtype=torch.bool)
    kept[0, 1, :8] = True  # one head keeps 8 channels; three keep none
    ids, am = left_padded([120], 97, gen)
    cache = prefill_and_decode(model, leank.ChannelMask(kept), ids, am, 2, sink=4, recent=8)
    layer = cache.layers[0]
    slots = layer.capacity + 1
    assert layer.mid_k.shape == (1, slots * 8)  # one head's 8 channels per token
    assert layer.mid_v.shape == (1, slots * 16)  # and that head's V only


@pytest.mark.parametrize("static", [False, True])
def test_hybrid_model_accounting(static):
    """Gemma 3 (sliding, full, sliding, full): the sliding layers are transformers' own, counted
    alike in allocated, ideal and dense bytes; the compressed layers as in a plain model; the
    dense figure equals transformers' default cache for the same generation."""
    from transformers import DynamicCache

    from leank.cache import dense_cache_nbytes

    model = tiny_model("gemma3", layers=4, head_dim=32)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids, am = left_padded([40, 25], 97, gen)
    mask = leank.ChannelMask.random(2, 2, 32, sparsity=0.6, alignment=8, generator=gen, layers=(1, 3))
    dense = DynamicCache(config=model.config)
    model.generate(input_ids=ids, attention_mask=am, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                   pad_token_id=0, **leank.cache_kwargs(dense))
    cache = prefill_and_decode(model, mask, ids, am, 10, sink=4, recent=8, max_length=50 if static else None)
    sliding = [cache.layers[i] for i in (0, 2)]
    assert cache.compressed == (1, 3) and all(type(layer).__name__.endswith("SlidingWindowLayer") for layer in sliding)
    sliding_bytes = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in sliding)
    leank_layers = cache.leank_layers()
    assert cache.nbytes() == sum(layer.nbytes() for layer in leank_layers) + sliding_bytes
    assert cache.nbytes() - cache.ideal_nbytes() == sum(cache.overhead_nbytes().values())
    if not static:  # a static sliding layer holds its whole window from the start
        assert cache.dense_nbytes() == dense_cache_nbytes(dense)
    ideal = independent_ideal(mask, [49, 34], None, 4, 8, 32, 4) + sliding_bytes  # the last token is not stored
    assert cache.ideal_nbytes() == ideal
