"""LeanK decoding against the independent masked-dense reference (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import leank
from leank.masks import mask_from_counts

from .conftest import left_padded, tiny_model
from .reference import reference_logits


def mask_with_counts(layers: int, kv_heads: int, head_dim: int, counts, generator) -> leank.ChannelMask:
    scores = torch.rand(layers, kv_heads, head_dim, generator=generator)
    counts = torch.as_tensor(counts, dtype=torch.long).view(layers, kv_heads)
    return leank.ChannelMask(mask_from_counts(scores, counts))


def run_and_compare(model, mask, ids, attention_mask, *, sink, recent, new_tokens, tol=1e-5, max_length=None,
                    layers=None):
    leank.enable(model)
    cache = leank.LeanKCache(model, mask, sink=sink, recent=recent, max_length=max_length)
    out = model.generate(
        input_ids=ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        **leank.cache_kwargs(cache),
    )
    got = torch.stack(out.logits, dim=1)  # [B, N, V]
    prompt_len = ids.shape[1]
    ref = reference_logits(
        model, out.sequences, attention_mask, kept=mask.kept, prompt_len=prompt_len,
        sink=sink, recent=recent, layers=layers,
    )[:, prompt_len - 1 : prompt_len - 1 + new_tokens]
    err = (got - ref).abs().max().item()
    assert err <= tol, f"max |logit - reference| = {err:.3g}"
    return cache, out, ref


def test_mixed_head_counts_long_generation():
    """Heads keeping 0/16/32/48/64 of 64 channels; tokens leave the ring at every step."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=2, kv_heads=5, groups=2, head_dim=64, qk_gain=3.0)
    mask = mask_with_counts(2, 5, 64, [0, 16, 32, 48, 64, 64, 48, 32, 16, 0], gen)
    ids, am = left_padded([50, 37, 44], 97, gen)
    cache, out, ref = run_and_compare(model, mask, ids, am, sink=4, recent=8, new_tokens=40)
    layer = cache.layers[0]
    assert layer.middle_length() > ids.shape[1], "decode must fill the middle store"
    # The check can fail: a dense (all-kept) reference differs far more than the tolerance.
    dense = reference_logits(
        model, out.sequences, am, kept=torch.ones_like(mask.kept), prompt_len=ids.shape[1],
        sink=4, recent=8,
    )[:, ids.shape[1] - 1 : ids.shape[1] - 1 + 40]
    assert (dense - ref).abs().max().item() > 1e-3


def test_prompt_shorter_than_sink_plus_recent():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("qwen3", layers=1, head_dim=32, qk_gain=3.0)
    mask = mask_with_counts(1, 2, 32, [0, 16], gen)
    ids, am = left_padded([3, 6], 97, gen)
    run_and_compare(model, mask, ids, am, sink=5, recent=7, new_tokens=30)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(["llama", "qwen2", "qwen3", "mistral"]),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 3),
    head_dim=st.sampled_from([16, 32]),
    alignment=st.sampled_from([1, 4, 8]),
    sparsity=st.floats(0.0, 0.95),
    sink=st.integers(0, 6),
    recent=st.integers(0, 10),
    static=st.booleans(),
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=3),
    new_tokens=st.integers(1, 25),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_property(
    arch, kv_heads, groups, head_dim, alignment, sparsity, sink, recent, static, lengths, new_tokens, seed
):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_model(arch, layers=2, kv_heads=kv_heads, groups=groups, head_dim=head_dim, qk_gain=3.0, seed=seed)
    mask = leank.ChannelMask.random(2, kv_heads, head_dim, sparsity=sparsity, alignment=alignment, generator=gen)
    ids, am = left_padded(lengths, 97, gen)
    max_length = max(lengths) + new_tokens if static else None
    run_and_compare(model, mask, ids, am, sink=sink, recent=recent, new_tokens=new_tokens, max_length=max_length)


def two_generate_calls(model, cache, gen, prompt: int = 40):
    """A 40-token prompt, 20 new tokens, then 15 more prompt tokens and 12 new ones on the same
    cache (a chat's second turn); returns the second call's output and its input length."""
    kw = dict(do_sample=False, pad_token_id=0, **leank.cache_kwargs(cache))
    first = model.generate(input_ids=torch.randint(3, 97, (1, prompt), generator=gen), max_new_tokens=20,
                           min_new_tokens=20, **kw)
    more = torch.cat([first, torch.randint(3, 97, (1, 15), generator=gen)], 1)
    # (an explicit mask: generate() would take generated pad-id tokens for padding)
    out = model.generate(input_ids=more, attention_mask=torch.ones_like(more), max_new_tokens=12, min_new_tokens=12,
                         output_logits=True, return_dict_in_generate=True, **kw)
    return out, more.shape[1]


@pytest.mark.parametrize("static", [False, True])
def test_second_generate_call_continues_the_cache(static):
    """A multi-token step after the prompt (a second ``generate`` on the same cache, as in a
    chat) is attended exactly by the rule, then stored: the reference over the whole text."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=2, kv_heads=2, head_dim=32, qk_gain=3.0)
    mask = mask_with_counts(2, 2, 32, [16, 0, 8, 32], gen)
    leank.enable(model)
    cache = leank.LeanKCache(model, mask, sink=3, recent=6, max_length=120 if static else None)
    out, n = two_generate_calls(model, cache, gen)
    got = torch.stack(out.logits, 1)
    # Reference: prompt dense, then every later query by the rule (the second chunk's queries
    # included), i.e. prompt_len = the first prompt.
    am = torch.ones_like(out.sequences)
    ref = reference_logits(model, out.sequences, am[:, :40], kept=mask.kept, prompt_len=40, sink=3, recent=6)
    assert (got - ref[:, n - 1 : n - 1 + 12]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_decode_attention_direct(backend):
    """decode_attention on a filled layer equals a float64 computation from the raw K/V."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, H, G, D, T, S, R = 2, 3, 2, 32, 70, 3, 6
    kept = torch.rand(H, D, generator=gen) < 0.4
    kept[0] = False
    layer = leank.LeanKLayer(kept, sink=S, recent=R)
    k = torch.randn(B, H, T, D, generator=gen)
    v = torch.randn(B, H, T, D, generator=gen)
    layer.update(k, v)
    layer.after_prefill(None, torch.tensor([0, 5]))
    q = torch.randn(B, H * G, 1, D, generator=gen)
    k1, v1 = torch.randn(B, H, 1, D, generator=gen), torch.randn(B, H, 1, D, generator=gen)
    layer.update(k1, v1)
    out = leank.decode_attention(q, layer.view, 0.3, backend=backend)
    K, V = torch.cat([k, k1], 2).double(), torch.cat([v, v1], 2).double()
    for b, pad in enumerate([0, 5]):
        for hq in range(H * G):
            h = hq // G
            pos = torch.arange(T + 1)
            full = (pos - pad < S) | (T - pos <= R)
            s_full = K[b, h] @ q[b, hq, 0].double() * 0.3
            s_mid = (K[b, h] * kept[h].double()) @ q[b, hq, 0].double() * 0.3
            s = torch.where(full, s_full, s_mid)
            visible = (pos >= pad) & (full | kept[h].any())
            p = torch.softmax(s.masked_fill(~visible, float("-inf")), 0)
            expected = p @ V[b, h]
            torch.testing.assert_close(out[b, hq, 0].double(), expected, atol=1e-5, rtol=1e-5)


def full_attention_layers(config) -> list[int]:
    """Written out from the config (not from the library): layers without a sliding window."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, t in enumerate(types) if t == "full_attention"]


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss", "gemma3"])
def test_hybrid_mask_rows_map_to_their_layers(arch):
    """Six layers, three compressed with three different masks: each row reaches its own layer
    (the reference is told the layers); told another order, the reference disagrees."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model(arch, layers=6, kv_heads=2, head_dim=32, qk_gain=3.0)
    layers = full_attention_layers(model.config)
    counts = torch.tensor([[0, 32], [8, 16], [24, 0]])[: len(layers)]
    mask = mask_with_counts(len(layers), 2, 32, counts, gen).with_meta(layers=tuple(layers))
    ids, am = left_padded([40, 23], 97, gen)
    kw = dict(sink=4, recent=8, new_tokens=30)
    run_and_compare(model, mask, ids, am, layers=layers, max_length=80, **kw)
    with pytest.raises(AssertionError):
        run_and_compare(model, mask, ids, am, layers=[layers[1], layers[0], *layers[2:]], **kw)


@pytest.mark.parametrize("static", [False, True])
def test_every_architecture_matches_reference(arch, static):
    """Random masks on each architecture (its scaling, soft-capping, sinks and sliding-window
    layers included): decode logits within 1e-5 of the float64 reference while 40 decoded
    tokens move through the ring into the middle store."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    head_dim = 96 if arch == "phi3" else 32
    model = tiny_model(arch, layers=2, kv_heads=2, head_dim=head_dim, qk_gain=3.0)
    layers = full_attention_layers(model.config)
    counts = torch.randint(0, head_dim // 8 + 1, (len(layers), 2), generator=gen) * 8
    counts[0, 0], counts[-1, -1] = 0, head_dim // 2  # an empty head and a partial one, always
    mask = mask_with_counts(len(layers), 2, head_dim, counts, gen)
    if len(layers) < model.config.num_hidden_layers:
        mask = mask.with_meta(layers=tuple(layers))
    ids, am = left_padded([40, 23, 31], 97, gen)
    cache, _, _ = run_and_compare(model, mask, ids, am, sink=4, recent=8, new_tokens=40, layers=layers,
                                  max_length=80 if static else None)
    assert cache.compressed == tuple(layers)
    assert cache.leank_layers()[0].middle_length() >= 40
