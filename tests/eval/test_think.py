"""ThinK baseline: channel choice and decode attention against float64 references written
from the definition, and generation identical to the full cache when nothing is pruned."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

import leank
from leank.attention import leank_attention
from leank.errors import LeanKError
from leank.eval.think import ThinKCache, ThinKLayer

from ..conftest import left_padded

B, HQ, H, D, T = 3, 4, 2, 16, 40
G = HQ // H
PADS = [0, 5, 17]


def reference_channels(query, keys, pads, *, keep, window):
    """Top ``keep`` channels of ||Q[:, c]|| * ||K[:, c]|| per row and KV head, one head at a time."""
    kept = torch.zeros(query.shape[0], keys.shape[1], keys.shape[-1], dtype=torch.bool)
    t = query.shape[2]
    for b, pad in enumerate(pads):
        rows = [i for i in range(t - window, t) if i >= pad]
        for h in range(keys.shape[1]):
            q = query[b, h * G : (h + 1) * G][:, rows].double()  # the query heads sharing KV head h
            k = keys[b, h, pad:].double()
            score = q.pow(2).sum(dim=(0, 1)).sqrt() * k.pow(2).sum(dim=0).sqrt()
            kept[b, h, score.topk(keep).indices] = True
    return kept


def reference_decode(query, keys, values, kept, pads, *, sink, recent, scaling):
    """One decode query ``[B, H_q, 1, D]`` over ``T`` keys, float64, key by key: full K for a
    row's first ``sink`` real tokens, the query itself and the ``recent`` keys before it; kept
    channels otherwise."""
    total = keys.shape[2]
    out = torch.zeros(query.shape[0], 1, query.shape[1], query.shape[-1], dtype=torch.float64)
    for b, pad in enumerate(pads):
        for j in range(query.shape[1]):
            h = j // G
            logits, vals = [], []
            for p in range(pad, total):
                full = p - pad < sink or (total - 1) - p <= recent
                k = keys[b, h, p].double() if full else keys[b, h, p].double() * kept[b, h].double()
                logits.append(query[b, j, 0].double() @ k * scaling)
                vals.append(values[b, h, p].double())
            weights = torch.softmax(torch.stack(logits), dim=0)
            out[b, 0, j] = (weights[:, None] * torch.stack(vals)).sum(0)
    return out


def prompt_mask(pads, t):
    """The boolean SDPA mask transformers builds for a left-padded prompt, ``[B, 1, T, T]``."""
    pos = torch.arange(t)
    causal = pos[None, :] <= pos[:, None]
    return torch.stack([causal & (pos[None, :] >= pad) for pad in pads])[:, None]


@pytest.mark.parametrize(("keep", "sink", "recent"), [(4, 4, 8), (11, 0, 3), (1, 6, 0)])
def test_channels_and_decode_match_references(keep, sink, recent):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    module = SimpleNamespace(num_key_value_groups=G, is_causal=True, layer_idx=0)
    scaling = D**-0.5
    layer = ThinKLayer(keep=keep, window=8, sink=sink, recent=recent)

    query, keys, values = rand(B, HQ, T, D), rand(B, H, T, D), rand(B, H, T, D)
    handle, _ = layer.update(keys, values)
    leank_attention(module, query, handle, handle, prompt_mask(PADS, T), scaling=scaling)
    assert torch.equal(layer.pads, torch.tensor(PADS))
    assert torch.equal(layer.kept, reference_channels(query, keys, PADS, keep=keep, window=8))
    assert (layer.kept.sum(-1) == keep).all()

    for _ in range(3):  # decode steps: new tokens join the recent window, older ones leave it
        q1, k1, v1 = rand(B, HQ, 1, D), rand(B, H, 1, D), rand(B, H, 1, D)
        keys, values = torch.cat([keys, k1], 2), torch.cat([values, v1], 2)
        handle, _ = layer.update(k1, v1)
        out, _ = leank_attention(module, q1, handle, handle, None, scaling=scaling)
        expected = reference_decode(q1, keys, values, layer.kept, PADS, sink=sink, recent=recent, scaling=scaling)
        assert out.shape == (B, 1, HQ, D)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        dense = reference_decode(q1, keys, values, torch.ones_like(layer.kept), PADS, sink=0, recent=0,
                                 scaling=scaling)
        assert (out.double() - dense).abs().max() > 1e-3  # the mask changes the result


def test_ideal_bytes():
    layer = ThinKLayer(keep=4, window=8, sink=2, recent=3)
    module = SimpleNamespace(num_key_value_groups=G, is_causal=True, layer_idx=0)
    keys = torch.randn(2, H, 10, D)
    handle, _ = layer.update(keys, keys)
    leank_attention(module, torch.randn(2, HQ, 10, D), handle, handle, prompt_mask([0, 6], 10), scaling=1.0)
    # Row 0: 10 real tokens = 5 full + 5 middle; row 1: 4 real tokens = 2 sink + 2 recent, all full.
    full_token, middle_token = 2 * H * D, H * (4 + D)
    assert layer.ideal_nbytes() == (5 * full_token + 5 * middle_token + 4 * full_token) * 4
    assert layer.dense_nbytes() == 2 * 2 * H * 10 * D * 4


@pytest.mark.parametrize("num_beams", [1, 2])
def test_nothing_pruned_generates_like_the_full_cache(tiny_lm, num_beams):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids, attention_mask = left_padded([50, 31, 12], 1000, gen)
    kwargs = dict(input_ids=ids, attention_mask=attention_mask, max_new_tokens=12, min_new_tokens=12,
                  do_sample=False, num_beams=num_beams, pad_token_id=0)
    dense = tiny_lm.generate(**kwargs, **leank.cache_kwargs(DynamicCache()))
    cache = ThinKCache(tiny_lm, sparsity=0.0, sink=4, recent=8)
    ours = tiny_lm.generate(**kwargs, **leank.cache_kwargs(cache))
    assert torch.equal(dense, ours)
    assert 0 < cache.ideal_nbytes() <= cache.dense_nbytes()


def test_cache_refuses_bad_settings(tiny_lm):
    with pytest.raises(LeanKError, match="keeps no channel"):
        ThinKCache(tiny_lm, sparsity=0.99)
    with pytest.raises(LeanKError, match="query window"):
        ThinKCache(tiny_lm, sparsity=0.5, window=0)
    with pytest.raises(LeanKError, match="sparsity must be"):
        ThinKCache(tiny_lm, sparsity=1.0)
