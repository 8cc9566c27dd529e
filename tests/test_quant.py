"""The middle store's quantisation format (leank.quant) against its documented bound, with
an unpacking and a per-group bound written out here."""

from __future__ import annotations

import pytest
import torch

from leank.errors import LeanKError
from leank.quant import KVQuant, dequantize, parse_quant, quantize


def unpack(codes: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Codes per value, by the documented layout (low nibble first)."""
    if bits == 8:
        return codes[..., :n].long()
    out = torch.empty(*codes.shape[:-1], 2 * codes.shape[-1], dtype=torch.long)
    out[..., 0::2] = codes.long() % 16
    out[..., 1::2] = codes.long() // 16
    return out[..., :n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits, group, n", [(8, 32, 64), (4, 32, 64), (4, 16, 23), (8, 8, 5), (4, 64, 96),
                                            (4, 32, 1), (8, 128, 128)])
def test_round_trip_within_the_bound(bits, group, n, dtype):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    quant = KVQuant(bits=bits, group=group)
    # Rows with an offset and outliers (post-RoPE K is neither centred nor flat), and a
    # constant row (scale 0).
    x = (torch.randn(6, 5, n, generator=gen) * torch.rand(6, 5, 1, generator=gen) * 4
         + torch.randn(6, 5, 1, generator=gen) * 3)
    x[0, 0] = 1.5
    x = x.to(dtype)
    codes, params = quantize(x, quant)
    assert codes.dtype == torch.uint8 and codes.shape == (6, 5, quant.row_bytes(n))
    assert params.dtype == dtype and params.shape == (6, 5, 2 * quant.row_groups(n))
    value_codes = unpack(codes, n, bits)
    assert value_codes.min() >= 0 and value_codes.max() <= 2**bits - 1
    # Per value: its group's true range and stored scale/zero, in float64.
    xd = x.double()
    group_of = torch.arange(n) // group
    scale, zero = params.double()[..., 0::2][..., group_of], params.double()[..., 1::2][..., group_of]
    lo = torch.stack([xd[..., group_of == j].amin(-1) for j in range(quant.row_groups(n))], -1)[..., group_of]
    hi = torch.stack([xd[..., group_of == j].amax(-1) for j in range(quant.row_groups(n))], -1)[..., group_of]
    true_scale = (hi - lo) / (2**bits - 1)
    rounding = (lo - zero).abs() + (2**bits - 1) * (scale - true_scale).abs()
    bound = true_scale / 2 + rounding + 1e-6 * (1 + xd.abs())
    x_hat = dequantize(codes, params, n, quant, torch.float64)
    assert torch.equal(x_hat, zero + value_codes.double() * scale)  # the documented formula
    err = (x_hat - xd).abs()
    assert (err <= bound).all(), (err - bound).max()
    # The bound is nearly reached (rounding to the nearest code, not truncation, is what it allows).
    if n > 1:
        assert (err > 0.3 * true_scale).any()
    assert torch.equal(x_hat[0, 0], xd[0, 0])  # a constant row comes back exactly


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits, group, n", [(8, 32, 64), (4, 32, 64), (4, 16, 23), (4, 64, 96), (4, 32, 1)])
def test_symmetric_round_trip_within_the_bound(bits, group, n, dtype):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    quant = KVQuant(bits=bits, group=group, symmetric=True)
    x = (torch.randn(6, 5, n, generator=gen) * torch.rand(6, 5, 1, generator=gen) * 4
         + torch.randn(6, 5, 1, generator=gen))
    x[0, 0] = 0.0  # an all-zero row: scale 0, codes 2^(bits-1)
    x = x.to(dtype)
    codes, params = quantize(x, quant)
    groups = -(-n // group)
    assert codes.shape == (6, 5, quant.row_bytes(n)) and params.shape == (6, 5, groups) and params.dtype == dtype
    value_codes = unpack(codes, n, bits)
    assert value_codes.min() >= 0 and value_codes.max() <= 2**bits - 1
    xd = x.double()
    group_of = torch.arange(n) // group
    mid = 2 ** (bits - 1)
    scale = params.double()[..., group_of]
    amax = torch.stack([xd[..., group_of == j].abs().amax(-1) for j in range(groups)], -1)[..., group_of]
    true_scale = amax / (mid - 1)
    bound = true_scale / 2 + mid * (scale - true_scale).abs() + 1e-6 * (1 + xd.abs())
    x_hat = dequantize(codes, params, n, quant, torch.float64)
    assert torch.equal(x_hat, (value_codes.double() - mid) * scale)  # the documented formula
    err = (x_hat - xd).abs()
    assert (err <= bound).all(), (err - bound).max()
    if n > 1:
        assert (err > 0.3 * true_scale).any()
    assert torch.equal(x_hat[0, 0], xd[0, 0]) and (value_codes[0, 0] == mid).all()


def test_bad_configs_and_names():
    for bad in (dict(bits=3), dict(bits=True), dict(group=12), dict(group=256), dict(bits=8.0)):
        with pytest.raises(LeanKError, match="KVQuant"):
            KVQuant(**bad)
    assert parse_quant("int8") == KVQuant(8, 32)
    assert parse_quant("int4g64") == KVQuant(4, 64)
    assert KVQuant(4, 64).label == "int4g64" and KVQuant(8).label == "int8"
    assert parse_quant("int4s") == KVQuant(4, 32, symmetric=True) and KVQuant(4, 64, True).label == "int4g64s"
    assert parse_quant(KVQuant(8, 16, True).label) == KVQuant(8, 16, True)
    with pytest.raises(LeanKError, match="symmetric"):
        KVQuant(4, 32, symmetric=1)
    assert parse_quant("int4sr") == KVQuant(4, 32, symmetric=True, rotate=True)
    assert KVQuant(8, 64, rotate=True).label == "int8g64r" and parse_quant("int8g64r") == KVQuant(8, 64, rotate=True)
    with pytest.raises(LeanKError, match="rotate"):
        KVQuant(4, rotate="yes")
    for bad in ("int3", "fp8", "int4g", "int4gx", "int", "int4ss", "s", "int4rs", "int4srr", "r"):
        with pytest.raises(LeanKError):
            parse_quant(bad)


def test_rotation_block_and_hadamard():
    """The block divides every kept count (largest power of two, at most the group); the Hadamard
    matrix is orthonormal and symmetric with entries ±1/√n, against its definition."""
    from leank.quant import hadamard, rotation_block

    assert rotation_block([0, 16, 48, 32], 32) == 16 and rotation_block([32, 64, 0], 32) == 32
    assert rotation_block([32, 64], 16) == 16 and rotation_block([5, 16], 32) == 1 and rotation_block([0, 0], 32) == 1
    for n in (1, 2, 8, 32):
        h = hadamard(n).double()
        assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-6) and torch.equal(h, h.T)
        assert torch.allclose(h.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))
        if n > 1:  # Sylvester: row i, column j has sign (-1)^popcount(i & j)
            signs = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(n)] for i in range(n)])
            assert torch.equal(torch.sign(h).long(), signs)
