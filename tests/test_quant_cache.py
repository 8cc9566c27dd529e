"""LeanK with a quantised middle store (KVQuant) against the independent reference.

The reference (tests/reference.py) reads the cache's middle store back with the unpacking
and layout written out here (:func:`stored_middle`: offsets from the head counts, codes
unpacked and dequantised in float64), checks every stored value against the true K/V within
half its step, and then attends with the stored values wherever the rule says a key is seen
through its kept channels. So the decode path (dequantisation, layout, merge) is checked
against code that shares nothing with it, and the store path against the true K/V.
"""

from __future__ import annotations

import pytest
import torch

import leank
from leank.errors import LeanKError

from .conftest import left_padded, tiny_model
from .reference import reference_logits
from .test_cache_reference import mask_with_counts, two_generate_calls
from .test_quant import unpack


def stored_middle(layer, T: int) -> tuple[torch.Tensor, ...]:
    """``(K, V, known, K step, V step)`` float64 ``[B, H, T, D]`` (``known`` ``[B, H, T]``) from a
    layer's quantised middle store, by the documented layout."""
    view = layer.view
    bits, group, slots = view.quant_bits, view.quant_group, view.slots
    ppg = 1 if view.quant_symmetric else 2  # params per group: scale (symmetric), or scale and zero
    B, H, _, D = view.ring_k.shape
    c0, M = int(view.c0), layer.middle_length()
    counts = [int(c) for c in layer.kept.sum(-1)]

    def rows(codes, params, off, poff, n):
        nb, ng = -(-n * bits // 8), -(-n // group)
        x = unpack(codes[:, off * slots : off * slots + M * nb].reshape(B, M, nb).cpu(), n, bits).double()
        p = params[:, poff * slots : poff * slots + M * ppg * ng].reshape(B, M, ng, ppg).cpu().double()
        g = torch.arange(n) // group
        if ppg == 1:  # x̂ = (code - 2^(bits-1)) · scale
            return (x - 2 ** (bits - 1)) * p[..., 0][..., g], p[..., 0][..., g]
        return p[..., 1][..., g] + x * p[..., 0][..., g], p[..., 0][..., g]

    K, V, k_step, v_step = (torch.zeros(B, H, T, D, dtype=torch.float64) for _ in range(4))
    koff = kpoff = voff = 0
    for h, c in enumerate(counts):
        if not c:
            continue
        chan = layer.kept[h].nonzero().flatten().cpu()
        k, ks = rows(view.mid_k, view.mid_kp, koff, kpoff, c)
        v, vs = rows(view.mid_v, view.mid_vp, voff * -(-D * bits // 8), voff * ppg * -(-D // group), D)
        K[:, h, c0 : c0 + M][..., chan], k_step[:, h, c0 : c0 + M][..., chan] = k, ks
        V[:, h, c0 : c0 + M], v_step[:, h, c0 : c0 + M] = v, vs
        koff, kpoff, voff = koff + -(-c * bits // 8), kpoff + ppg * -(-c // group), voff + 1
    known = torch.zeros(B, H, T, dtype=torch.bool)
    known[:, :, c0 : c0 + M] = torch.tensor([c > 0 for c in counts])[None, :, None]  # empty heads store nothing
    known &= (torch.arange(T)[None] >= (view.pads.cpu() + view.sink)[:, None])[:, None]  # a row's sink is not there
    return K, V, known, k_step, v_step


def generate_and_compare(model, mask, ids, am, *, quant, sink, recent, new_tokens, max_length=None, tol=1e-5,
                         rotation=None):
    leank.enable(model)
    cache = leank.LeanKCache(model, mask, sink=sink, recent=recent, max_length=max_length, quant=quant)
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                         **leank.cache_kwargs(cache))
    got = torch.stack(out.logits, 1)
    n = ids.shape[1]
    done = out.sequences[:, :-1]  # the tokens the cache has seen (the last one was never fed)
    stored = [stored_middle(layer, done.shape[1]) for layer in cache.leank_layers()]
    ref = reference_logits(model, done, am, kept=mask.kept, prompt_len=n, sink=sink, recent=recent,
                           stored=stored, rotation=rotation)[:, n - 1 : n - 1 + new_tokens]
    err = (got - ref).abs().max().item()
    assert err <= tol, f"max |logit - reference| = {err:.3g}"
    return cache, out, ref


@pytest.mark.parametrize("quant", [leank.KVQuant(8), leank.KVQuant(4), leank.KVQuant(4, 8),
                                   leank.KVQuant(4, 16, symmetric=True)], ids=str)
@pytest.mark.parametrize("static", [False, True])
def test_quantised_decode_matches_reference(quant, static):
    """Heads keeping 0, 5 (odd: a half byte), 16, 23 and 64 of 64 channels, left-padded rows,
    40 decoded tokens moving through the ring into the quantised middle store."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=2, kv_heads=5, groups=2, head_dim=64, qk_gain=3.0)
    mask = mask_with_counts(2, 5, 64, [0, 5, 16, 23, 64, 64, 23, 16, 5, 0], gen)
    ids, am = left_padded([44, 31, 38], 97, gen)
    cache, out, ref = generate_and_compare(model, mask, ids, am, quant=quant, sink=4, recent=8, new_tokens=40,
                                           max_length=84 if static else None)
    assert cache.leank_layers()[0].middle_length() > ids.shape[1]
    # The check can fail: the unquantised reference differs by far more than the tolerance.
    plain = reference_logits(model, out.sequences, am, kept=mask.kept, prompt_len=ids.shape[1], sink=4,
                             recent=8)[:, ids.shape[1] - 1 : ids.shape[1] + 39]
    assert (plain - ref).abs().max().item() > 1e-3


def own_rotation(kept: torch.Tensor, group: int) -> torch.Tensor:
    """float64 ``[H, D, D]``, written here from the format's description (leank.quant), not imported:
    normalised Sylvester Hadamard blocks over each head's consecutive kept channels (the block: the
    largest power of two up to ``group`` dividing every non-zero count of the layer), identity on the
    other channels; K is stored as ``K @ rotation[h]``."""
    H, D = kept.shape
    counts = [int(c) for c in kept.sum(-1) if c]
    block = group
    while block > 1 and any(c % block for c in counts):
        block //= 2
    had = torch.ones(1, 1, dtype=torch.float64)
    while had.shape[0] < block:
        had = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), had)
    had /= block**0.5
    out = torch.eye(D, dtype=torch.float64).repeat(H, 1, 1)
    for h in range(H):
        chan = kept[h].nonzero().flatten()
        for j in range(0, len(chan), block):
            idx = chan[j : j + block]
            out[h][idx[:, None], idx[None, :]] = had
    return out


@pytest.mark.parametrize("quant", [leank.KVQuant(4, 32, symmetric=True, rotate=True),
                                   leank.KVQuant(8, 16, rotate=True)], ids=str)
@pytest.mark.parametrize("static", [False, True])
def test_rotated_decode_matches_reference(quant, static):
    """Rotated K (``KVQuant(rotate=True)``): the middle store holds the kept K channels times the
    layer's Hadamard blocks (checked value by value against the true K rotated by the test's own
    matrices, within half a step), and decoding equals the reference that turns them back; layer 0
    keeps 0/16/32/48/64 channels per head (blocks of 16), layer 1 32/64 (blocks of 32 at group 32)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=2, kv_heads=5, groups=2, head_dim=64, qk_gain=3.0)
    mask = mask_with_counts(2, 5, 64, [0, 16, 32, 48, 64, 32, 64, 0, 32, 64], gen)
    ids, am = left_padded([44, 31, 38], 97, gen)
    rotation = [own_rotation(kept, quant.group) for kept in mask.kept]
    kw = dict(quant=quant, sink=4, recent=8, new_tokens=40, max_length=84 if static else None)
    cache, out, _ = generate_and_compare(model, mask, ids, am, rotation=rotation, **kw)
    assert [layer.rotation.shape[0] for layer in cache.leank_layers()] == [16, min(32, quant.group)]
    # The store really holds rotated K: read as plain K it is off by more than half a step.
    done = out.sequences[:, :-1]
    stored = [stored_middle(layer, done.shape[1]) for layer in cache.leank_layers()]
    with pytest.raises(AssertionError, match="stored middle is off"):
        reference_logits(model, done, am, kept=mask.kept, prompt_len=ids.shape[1], sink=4, recent=8, stored=stored)


@pytest.mark.parametrize("quant", [leank.KVQuant(4, 16), leank.KVQuant(4, 16, symmetric=True, rotate=True)], ids=str)
def test_second_generate_call_and_qwen3(quant):
    """A multi-token step after the prompt (ring keys seen through their kept channels are seen
    quantised, as they will be stored; rotated K: the step's queries and K rotated too) on another
    architecture."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("qwen3", layers=2, kv_heads=2, head_dim=32, qk_gain=3.0)
    mask = mask_with_counts(2, 2, 32, [16, 0, 8, 32], gen)
    leank.enable(model)
    cache = leank.LeanKCache(model, mask, sink=3, recent=6, quant=quant)
    out, n = two_generate_calls(model, cache, gen)
    got = torch.stack(out.logits, 1)
    done = out.sequences[:, :-1]
    am = torch.ones_like(done)
    stored = [stored_middle(layer, done.shape[1]) for layer in cache.leank_layers()]
    rotation = [own_rotation(kept, quant.group) for kept in mask.kept] if quant.rotate else None
    ref = reference_logits(model, done, am[:, :40], kept=mask.kept, prompt_len=40, sink=3, recent=6,
                           stored=stored, rotation=rotation)
    assert (got - ref[:, n - 1 : n - 1 + 12]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("static", [False, True])
def test_beam_reorder_moves_every_quantised_store(static):
    """``reorder_cache`` (beam search) moves codes and scale/zero pairs with their rows: a layer
    reordered by ``beam_idx`` decodes exactly as a layer built from the reordered histories."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, H, G, D, T = 3, 3, 2, 32, 40
    kept = mask_with_counts(1, H, D, [0, 7, 16], gen).kept[0]
    quant = leank.KVQuant(4, 16)
    k, v = torch.randn(B, H, T, D, generator=gen), torch.randn(B, H, T, D, generator=gen)
    steps = [(torch.randn(B, H, 1, D, generator=gen), torch.randn(B, H, 1, D, generator=gen)) for _ in range(6)]
    beam_idx = torch.tensor([2, 0, 2])

    def layer_from(rows):
        layer = leank.LeanKLayer(kept, sink=2, recent=4, quant=quant, max_length=T + 8 if static else None)
        layer.update(k[rows], v[rows])
        layer.after_prefill(None, torch.zeros(B, dtype=torch.long))
        for k1, v1 in steps:
            layer.update(k1[rows], v1[rows])
        return layer

    reordered = layer_from(torch.arange(B))
    reordered.reorder_cache(beam_idx)
    fresh = layer_from(beam_idx)
    assert reordered.middle_length() > 20
    k1, v1, q = torch.randn(B, H, 1, D, generator=gen), torch.randn(B, H, 1, D, generator=gen), torch.randn(
        B, H * G, 1, D, generator=gen)
    for layer in (reordered, fresh):
        layer.update(k1, v1)
    a, b = (leank.decode_attention(q, layer.view, 0.2, backend="torch") for layer in (reordered, fresh))
    assert torch.equal(a, b)
    for name in ("mid_k", "mid_v", "mid_kp", "mid_vp"):
        assert torch.equal(getattr(reordered, name), getattr(fresh, name)), name


def test_beam_search_generates():
    """Beam search through generate() with a quantised cache: every beam row is kept, and the
    best beam's logits path runs (the stores' reorders are checked above)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=2, kv_heads=2, head_dim=32, qk_gain=3.0)
    mask = mask_with_counts(2, 2, 32, [8, 0, 16, 32], gen)
    leank.enable(model)
    ids, am = left_padded([30, 22], 97, gen)
    cache = leank.LeanKCache(model, mask, sink=3, recent=5, quant=leank.KVQuant(4, 16), max_length=ids.shape[1] + 24)
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                         num_beams=3, num_return_sequences=3, pad_token_id=0, **leank.cache_kwargs(cache))
    assert out.shape == (6, ids.shape[1] + 24)
    assert cache.leank_layers()[0].mid_kp.shape[0] == 6


def test_bytes_count_codes_scales_and_zero_points():
    """Allocated and ideal bytes of a quantised cache, from the format written out here."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    model = tiny_model("llama", layers=1, kv_heads=3, groups=1, head_dim=64)
    counts = [0, 16, 23]
    mask = mask_with_counts(1, 3, 64, counts, gen)
    leank.enable(model)
    sink, recent, prompt, new = 4, 8, 60, 10
    for quant in (leank.KVQuant(8), leank.KVQuant(4, 16), leank.KVQuant(4, 16, symmetric=True)):
        cache = leank.LeanKCache(model, mask, sink=sink, recent=recent, max_length=prompt + new, quant=quant)
        ids = torch.randint(3, 97, (2, prompt), generator=gen)
        model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                       **leank.cache_kwargs(cache))
        seen = prompt + new - 1
        bits, g = quant.bits, quant.group
        ppg = 1 if quant.symmetric else 2  # fp32 scales, and zero points unless symmetric
        middle_token = sum(-(-c * bits // 8) + ppg * 4 * -(-c // g) + 64 * bits // 8 + ppg * 4 * -(-64 // g)
                           for c in counts if c)
        full_token = 2 * 3 * 64 * 4
        ideal = 2 * ((sink + recent) * full_token + (seen - sink - recent) * middle_token)
        assert cache.ideal_nbytes() == ideal
        overhead = cache.overhead_nbytes()
        assert cache.nbytes() == ideal + sum(overhead.values())
        capacity, stored = prompt + new - (recent + 1) - sink, seen - (recent + 1) - sink
        assert overhead["middle_slack"] == 2 * (capacity + 1 - stored) * middle_token  # unfilled slots + scratch
        layer = cache.leank_layers()[0]
        assert layer.mid_k.dtype == torch.uint8 and layer.mid_kp.dtype == torch.float32
    with pytest.raises(LeanKError, match="KVQuant"):
        leank.LeanKCache(model, mask, quant=4)
