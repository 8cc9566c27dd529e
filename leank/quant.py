"""KV quantisation of the middle store: the format and its torch quantiser/dequantiser.

    quant = KVQuant(bits=4, group=32)
    codes, params = quantize(x, quant)            # x [..., n] -> uint8 [..., row_bytes(n)], [..., row_params(n)]
    x_hat = dequantize(codes, params, n, quant)   # fp32 [..., n]

**The format** (one row = one token's kept K channels of one KV head, or its V): the row's
``n`` values are cut into groups of ``group`` consecutive values (the last one may be
shorter). Each group stores a ``scale`` and a ``zero`` (its minimum), both in the cache's
dtype, interleaved (``scale, zero`` per group); each value stores the code
``clamp(floor((x - zero) / scale + 1/2), 0, 2^bits - 1)`` computed in fp32 from the
*stored* (rounded) scale and zero, where ``scale = (max - min) / (2^bits - 1)`` (a group
of equal values has scale 0 and codes 0). ``x̂ = zero + code · scale``. ``bits = 8``: one
code per byte; ``bits = 4``: two per byte, value ``2j`` in the low nibble and ``2j + 1``
in the high one (an odd row ends with a half-used byte).

Bound: in fp32, ``|x - x̂| <= scale / 2`` up to fp32 rounding; in fp16/bf16 also the
rounding of ``scale`` and ``zero`` to the dtype (``|min - zero| + (2^bits - 1) |Δscale|``).

``symmetric=True`` (labels ``int8s``, ``int4s``, ``int4g64s``): no zero point, half the
params — a group stores only ``scale = max|x| / (2^(bits-1) - 1)`` and each value the code
``clamp(floor(x / scale + 1/2) + 2^(bits-1), 0, 2^bits - 1)``; ``x̂ = (code - 2^(bits-1)) · scale``
(one code, 0, unused). Same bound, with ``scale`` from the larger magnitude; it pays where rows
are short (a K row of 16 kept channels carries a whole group's params).

``rotate=True`` (labels end in ``r``: ``int4sr``): before quantising, each token's kept K channels
are multiplied by a normalised Hadamard matrix in blocks of ``b`` consecutive kept channels (in the
head's channel order; ``b`` from :func:`rotation_block`: the largest power of two that divides every
kept count of the layer, at most ``group``), and the query's kept channels by the same matrix, so
every score is unchanged in exact arithmetic (the matrix is orthonormal and maps a head's kept
channels onto themselves). The cache applies it to every K it stores (sink, ring and middle, so the
stores and kernels are unchanged) and to every query it attends with. Why: rotation spreads a
token's large channels over its block, so a group's scale fits its values better; on a CPU proxy
(real SmolLM2 activations, the bundled 70% mask) it cut the int4s error of the attention outputs
from 0.054 to 0.042 (``benchmarks/results/quant_error_smollm2``). V is not rotated. Its cost in fp16/bf16:
the rotated K (sink and ring included, which are otherwise stored exactly) and queries are rounded to the
cache dtype once more, a score error about the size of one more bf16 rounding of K (a review reproduced ~4×
the int4s output error on sink/ring keys with large kept channels); rotating only what is quantised would
avoid it but needs the kernels to take a second, rotated query. Measured (SmolLM2-135M, bf16, the bundled 70%
mask, RULER-style suite, 100 samples per task): int4sr 29.6 / 19.3 at 4K / 8K against int4s 27.8 / 18.9 and
the full cache 31.1 / 19.4 (``benchmarks/results/eval_smollm2_100``) — that cost does not outweigh the gain.

Why this grouping (see docs/LOG.md, issue 14): tokens enter the middle store one per
decode step, so per-token groups along channels quantise each token on its own as it
leaves the ring (no staging buffer); asymmetric (with a zero point) because post-RoPE K
channels are not centred. The Triton store kernel (:mod:`leank.kernels.triton_store`)
writes the same codes; the Triton decode kernel dequantises in its loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import LeanKError

BITS = (4, 8)
GROUPS = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class KVQuant:
    """How the middle store is quantised: ``bits`` per value (8 or 4) and ``group`` values
    per scale/zero pair (a power of two, 8 to 128)."""

    bits: int = 8
    group: int = 32
    symmetric: bool = False
    rotate: bool = False

    def __post_init__(self) -> None:
        if type(self.bits) is not int or self.bits not in BITS:
            raise LeanKError(f"KVQuant bits must be 8 or 4, got {self.bits!r}")
        if type(self.group) is not int or self.group not in GROUPS:
            raise LeanKError(f"KVQuant group must be one of {', '.join(map(str, GROUPS))}, got {self.group!r}")

        if type(self.symmetric) is not bool:
            raise LeanKError(f"KVQuant symmetric must be True or False, got {self.symmetric!r}")
        if type(self.rotate) is not bool:
            raise LeanKError(f"KVQuant rotate must be True or False, got {self.rotate!r}")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def mid(self) -> int:
        """The code of 0 in the symmetric format."""
        return 1 << (self.bits - 1)

    @property
    def params_per_group(self) -> int:
        """Scale and zero (2), or only the scale when symmetric (1)."""
        return 1 if self.symmetric else 2

    @property
    def label(self) -> str:
        """``int8``, ``int4`` (``int4g64`` for a group other than 32; then ``s``: symmetric, ``r``: rotated K)."""
        return (f"int{self.bits}" + ("" if self.group == 32 else f"g{self.group}") + ("s" if self.symmetric else "")
                + ("r" if self.rotate else ""))

    def row_bytes(self, n: int) -> int:
        """Code bytes of a row of ``n`` values."""
        return (n * self.bits + 7) // 8

    def row_groups(self, n: int) -> int:
        """Groups of a row of ``n`` values."""
        return -(-n // self.group)

    def row_params(self, n: int) -> int:
        """Params (scales and zeros) of a row of ``n`` values."""
        return self.params_per_group * self.row_groups(n)


def parse_quant(text: str) -> KVQuant:
    """``int8``, ``int4``, ``int4g64``, ``int4s``, ``int4g64s``, ``int4sr`` … → :class:`KVQuant`."""
    rotate = text.endswith("r")
    rest = text[:-1] if rotate else text
    symmetric = rest.endswith("s")
    body, sep, group = (rest[:-1] if symmetric else rest).partition("g")
    if not body.startswith("int") or not body[3:].isdigit() or (sep and not group.isdigit()):
        raise LeanKError(f"unknown KV quantisation {text!r}: use int8, int4, e.g. int4g64, then s for symmetric "
                         "and r for rotated K (e.g. int4sr)")
    return KVQuant(bits=int(body[3:]), group=int(group) if group else 32, symmetric=symmetric, rotate=rotate)


def rotation_block(counts, group: int) -> int:
    """The Hadamard block of a layer whose heads keep ``counts`` K channels: the largest power of two
    that divides every non-zero count, at most ``group`` (1: no rotation, also for a layer keeping nothing)."""
    if not any(counts):
        return 1
    block = group
    while block > 1 and any(c % block for c in counts if c):
        block //= 2
    return block


def hadamard(n: int, device=None) -> torch.Tensor:
    """The normalised ``n × n`` Hadamard matrix (Sylvester; ``n`` a power of two), fp32, symmetric
    and orthonormal."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(device)


def quantize(x: torch.Tensor, quant: KVQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x`` ``[..., n]`` → codes uint8 ``[..., row_bytes(n)]`` and params ``[..., row_params(n)]``
    (``scale, zero`` per group, or ``scale`` when symmetric, in ``x``'s dtype); see the module docstring."""
    n, g = x.shape[-1], quant.group
    groups = quant.row_groups(n)
    pad = groups * g - n
    xf = x.float()
    # A tensor divisor: torch on CUDA divides by a Python scalar as a multiply by its reciprocal
    # (not IEEE), and the store kernel's scales must equal these bit for bit. (Under torch.compile
    # inductor may fold this constant divisor into a reciprocal too: the compiled CUDA path stores
    # with the Triton kernel, so only backend="torch" + compile would differ, by an ulp.)
    if quant.symmetric:
        amax = F.pad(xf.abs(), (0, pad)).unflatten(-1, (groups, g)).amax(-1)
        scale = (amax / torch.full_like(amax, quant.mid - 1)).to(x.dtype)
        zero = None
        z, offset = 0.0, quant.mid
    else:
        lo = F.pad(xf, (0, pad), value=float("inf")).unflatten(-1, (groups, g)).amin(-1)
        hi = F.pad(xf, (0, pad), value=float("-inf")).unflatten(-1, (groups, g)).amax(-1)
        scale = ((hi - lo) / torch.full_like(hi, quant.levels)).to(x.dtype)
        zero = lo.to(x.dtype)
        z, offset = zero.float().repeat_interleave(g, -1)[..., :n], 0
    s = scale.float().repeat_interleave(g, -1)[..., :n]
    codes = (torch.floor((xf - z) / torch.where(s > 0, s, 1.0) + 0.5) + offset).clamp_(0, quant.levels)
    codes = codes.to(torch.uint8)
    if quant.bits == 4:
        codes = F.pad(codes, (0, n % 2))
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale if zero is None else torch.stack([scale, zero], -1).flatten(-2)


def dequantize(codes: torch.Tensor, params: torch.Tensor, n: int, quant: KVQuant,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes ``[..., row_bytes(n)]`` and params ``[..., row_params(n)]`` → values ``[..., n]`` in ``dtype``."""
    if quant.bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], -1).flatten(-2)
    codes = codes[..., :n].to(dtype)
    p = params.to(dtype).unflatten(-1, (-1, quant.params_per_group))
    scale = p[..., 0].repeat_interleave(quant.group, -1)[..., :n]
    if quant.symmetric:
        return (codes - quant.mid) * scale
    zero = p[..., 1].repeat_interleave(quant.group, -1)[..., :n]
    return zero + codes * scale
