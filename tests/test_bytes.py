"""KV-cache byte accounting: what is allocated against the ideal figure and its documented overhead."""

from __future__ import annotations

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


def test_measured_bytes_within_ideal_plus_documented_overhead():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=3, kv_heads=4, groups=1, head_dim=32)
    mask = leank.ChannelMask.random(3, 4, 32, sparsity=0.7, alignment=8, generator=gen)
    ids, am = left_padded([200, 150, 181], 97, gen)
    for steps in (1, 9, 40):
        cache = prefill_and_decode(model, mask, ids, am, steps, sink=8, recent=16, chunk=16)
        seen = cache.get_seq_length()
        lengths = [seen - int((am[b] == 0).sum()) for b in range(3)]
        ideal = independent_ideal(mask, lengths, None, 8, 16, 32, 4)
        assert cache.ideal_nbytes() == ideal
        allocated = sum(
            t.numel() * t.element_size()
            for layer in cache.layers
            for t in [layer.window_k, layer.window_v, layer.sink_k, layer.sink_v, layer.pads]
            + [x for g in layer.groups for x in (g.keys, g.values, g.heads, g.channels)]
            + list(layer.head_tables)
        )
        assert cache.nbytes() == allocated
        overhead = cache.overhead_nbytes()
        assert ideal <= allocated <= ideal + sum(overhead.values()), (allocated, ideal, overhead)
        assert allocated < cache.dense_nbytes()


def test_fully_pruned_heads_store_no_middle_values():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=1, kv_heads=4, groups=1, head_dim=16)
    kept = torch.zeros(1, 4, 16, dtype=torch.bool)
    kept[0, 1, :8] = True  # one head keeps 8 channels; three keep none
    ids, am = left_padded([120], 97, gen)
    cache = prefill_and_decode(model, leank.ChannelMask(kept), ids, am, 2, sink=4, recent=8, chunk=8)
    layer = cache.layers[0]
    assert len(layer.groups) == 1
    g = layer.groups[0]
    assert g.heads.tolist() == [1]
    assert g.keys.shape[1:] == (1, layer.middle_capacity(), 8) and g.values.shape[1] == 1
