"""The decode step's cache update as one Triton launch per layer (CUDA, or the interpreter).

Program ``(b, h)`` of grid ``(B * H_kv,)`` does for KV head ``h`` of row ``b`` what
:meth:`leank.cache.LeanKLayer._step` does with torch ops (the reference): the token
``W`` positions back leaves ring slot ``seen % W`` — into the sink if it is among the
row's first ``S`` real tokens, and into the middle store (its kept K channels and its V)
if its middle slot exists — then the new token takes that slot. Writes that belong
nowhere are masked off rather than sent to the scratch slots. The caller then adds one to
``seen`` (every program reads it first, so the kernel itself cannot).

A quantised middle store (``QBITS`` 8 or 4) gets the leaving token's kept K channels and V
as codes and per-group ``(scale, zero)`` pairs, computed as :func:`leank.quant.quantize`
does (fp32, from the scale and zero rounded to the cache dtype, ``floor(x / s + 1/2)``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contract import DecodeView


@triton.jit
def row_bytes(n, QBITS: tl.constexpr):
    """Code bytes of a quantised row of ``n`` values (``leank.quant.KVQuant.row_bytes``)."""
    return (n * QBITS + 7) // 8


@triton.jit
def row_params(n, GROUP: tl.constexpr, SYM: tl.constexpr):
    """Scale (and zero) entries of a quantised row of ``n`` values (``leank.quant.KVQuant.row_params``)."""
    return (1 if SYM else 2) * ((n + GROUP - 1) // GROUP)


@triton.jit
def _quantize_row(x, valid, PARAM_TY: tl.constexpr, LEVELS: tl.constexpr, DP: tl.constexpr, GROUP: tl.constexpr,
                  SYM: tl.constexpr):
    """A row ``x`` fp32 ``[DP]`` (``valid`` lanes) → codes int32 ``[DP]`` (0 on invalid lanes) and
    its groups' scale and zero ``[DP // GROUP]`` as stored (rounded to ``PARAM_TY``; ``SYM``: the
    symmetric format, zero unused)."""
    xg = tl.reshape(x, (DP // GROUP, GROUP))
    vg = tl.reshape(valid, (DP // GROUP, GROUP))
    used = tl.max(vg.to(tl.int32), 1) > 0
    # IEEE divisions (div_rn; Triton's "/" is approximate on a GPU) and round-to-nearest casts, as torch
    # computes them: the stored scales and codes are the torch path's, bit for bit.
    if SYM:
        MID: tl.constexpr = (LEVELS + 1) // 2
        amax = tl.max(tl.where(vg, tl.abs(xg), 0.0), 1)
        scale = tl.where(used, tl.div_rn(amax, MID - 1.0), 0.0).to(PARAM_TY, fp_downcast_rounding="rtne")
        zero = scale
        base = xg
        offset = MID + 0.0
    else:
        lo = tl.min(tl.where(vg, xg, float("inf")), 1)
        hi = tl.max(tl.where(vg, xg, float("-inf")), 1)
        scale = tl.where(used, tl.div_rn(hi - lo, LEVELS + 0.0), 0.0).to(PARAM_TY, fp_downcast_rounding="rtne")
        zero = tl.where(used, lo, 0.0).to(PARAM_TY, fp_downcast_rounding="rtne")
        base = xg - zero.to(tl.float32)[:, None]
        offset = 0.0
    s = scale.to(tl.float32)
    d = tl.where(s > 0, s, 1.0)[:, None]
    q = tl.floor(tl.div_rn(base, tl.broadcast_to(d, xg.shape)) + 0.5) + offset
    q = tl.minimum(tl.maximum(q, 0.0), LEVELS).to(tl.int32)
    codes = tl.where(valid, tl.reshape(q, (DP,)), 0)
    return codes, scale, zero


@triton.jit
def _store_row(CODES, PARAMS, x, valid, n, QBITS: tl.constexpr, DP: tl.constexpr, GROUP: tl.constexpr,
               SYM: tl.constexpr):
    """Quantise a row of ``n`` values and store its codes at ``CODES`` and (scale, zero) pairs (``SYM``:
    scales) at ``PARAMS``."""
    codes, scale, zero = _quantize_row(x, valid, PARAMS.dtype.element_ty, (1 << QBITS) - 1, DP, GROUP, SYM)
    if QBITS == 8:
        offs = tl.arange(0, DP)
        tl.store(CODES + offs, codes.to(tl.uint8), mask=offs < n)
    else:
        low, high = tl.split(tl.reshape(codes, (DP // 2, 2)))
        offs = tl.arange(0, DP // 2)
        tl.store(CODES + offs, (low | (high << 4)).to(tl.uint8), mask=offs < (n + 1) // 2)
    offs_g = tl.arange(0, DP // GROUP)
    gmask = offs_g < (n + GROUP - 1) // GROUP
    if SYM:
        tl.store(PARAMS + offs_g, scale, mask=gmask)
    else:
        tl.store(PARAMS + 2 * offs_g, scale, mask=gmask)
        tl.store(PARAMS + 2 * offs_g + 1, zero, mask=gmask)


@triton.jit(do_not_specialize=["S", "RING", "SLOTS"])
def _store_step_kernel(
    K, V, stride_kb, stride_kh, stride_vb, stride_vh,
    SK, SV, stride_sb, stride_sh, S,
    RK, RV, stride_rb, stride_rh, RING,
    MK, MV, stride_mkb, stride_mvb, SLOTS,
    HEAD_C, HEAD_KOFF, HEAD_VOFF, HEAD_CHAN, PADS, SEEN, C0, H,
    MKP, MVP, stride_mkpb, stride_mvpb, HEAD_KPOFF,
    D: tl.constexpr, DP: tl.constexpr, SINK_WRITE: tl.constexpr, MIDDLE: tl.constexpr,
    QBITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs = tl.arange(0, DP)
    dmask = offs < D
    seen = tl.load(SEEN)
    pos = seen - RING  # the leaving token's position (< 0: the ring is not full yet)
    ring = b * stride_rb + h * stride_rh + (seen % RING) * D
    k_old = tl.load(RK + ring + offs, mask=dmask)
    v_old = tl.load(RV + ring + offs, mask=dmask)
    c = tl.load(HEAD_C + h)
    cmask = offs < c
    k_kept = tl.load(RK + ring + tl.load(HEAD_CHAN + h * D + offs, mask=cmask, other=0), mask=cmask)
    k_new = tl.load(K + b * stride_kb + h * stride_kh + offs, mask=dmask)
    v_new = tl.load(V + b * stride_vb + h * stride_vh + offs, mask=dmask)
    tl.debug_barrier()  # every read of the slot before it is overwritten
    if SINK_WRITE:
        s = pos - tl.load(PADS + b)
        if (pos >= 0) & (s >= 0) & (s < S):
            sink = b * stride_sb + h * stride_sh + s * D + offs
            tl.store(SK + sink, k_old, mask=dmask)
            tl.store(SV + sink, v_old, mask=dmask)
    if MIDDLE:
        i = pos - tl.load(C0)
        if (c > 0) & (pos >= 0) & (i >= 0) & (i < SLOTS - 1):
            if QBITS > 0:  # codes and (scale, zero) pairs: leank.contract's quantised layout
                kb = row_bytes(c, QBITS)
                kp = row_params(c, GROUP, SYM)
                VB = row_bytes(D, QBITS)
                VP = row_params(D, GROUP, SYM)
                voff = tl.load(HEAD_VOFF + h).to(tl.int64) * SLOTS
                _store_row(MK + b * stride_mkb + tl.load(HEAD_KOFF + h).to(tl.int64) * SLOTS + i * kb,
                           MKP + b * stride_mkpb + tl.load(HEAD_KPOFF + h).to(tl.int64) * SLOTS + i * kp,
                           k_kept.to(tl.float32), cmask, c, QBITS, DP, GROUP, SYM)
                _store_row(MV + b * stride_mvb + voff * VB + i * VB,
                           MVP + b * stride_mvpb + voff * VP + i * VP, v_old.to(tl.float32), dmask, D,
                           QBITS, DP, GROUP, SYM)
            else:
                k_at = tl.load(HEAD_KOFF + h).to(tl.int64) * SLOTS + i * c
                v_at = tl.load(HEAD_VOFF + h).to(tl.int64) * SLOTS * D + i * D
                tl.store(MK + b * stride_mkb + k_at + offs, k_kept, mask=cmask)
                tl.store(MV + b * stride_mvb + v_at + offs, v_old, mask=dmask)
    tl.store(RK + ring + offs, k_new, mask=dmask)
    tl.store(RV + ring + offs, v_new, mask=dmask)


def quant_args(view: DecodeView) -> tuple:
    """The quantised store's pointers, row strides and table for a kernel launch (the plain
    middle buffers stand in when the store is not quantised: never read then)."""
    if not view.quant_bits:
        return view.mid_k, view.mid_v, 0, 0, view.head_koff
    return view.mid_kp, view.mid_vp, view.mid_kp.stride(0), view.mid_vp.stride(0), view.head_kpoff


def store_step_triton(key: torch.Tensor, value: torch.Tensor, view: DecodeView, *, sink_write: bool) -> None:
    """Store one new token per row (K/V ``[B, H_kv, 1, D]``) and count it (``seen += 1``)."""
    B, H, _, D = key.shape
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    rk, rv, sk = view.ring_k, view.ring_v, view.sink_k
    DP = triton.next_power_of_2(D)
    _store_step_kernel[(B * H,)](
        key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        sk, view.sink_v, sk.stride(0), sk.stride(1), view.sink,
        rk, rv, rk.stride(0), rk.stride(1), rk.shape[2],
        view.mid_k, view.mid_v, view.mid_k.stride(0), view.mid_v.stride(0), view.slots,
        view.head_c, view.head_koff, view.head_voff, view.head_chan, view.pads, view.seen, view.c0, H,
        *quant_args(view),
        D=D, DP=DP, SINK_WRITE=sink_write and view.sink > 0, MIDDLE=any(view.head_counts),
        QBITS=view.quant_bits, GROUP=min(view.quant_group, DP) if view.quant_bits else 1,
        SYM=view.quant_symmetric, num_warps=1,
    )
    view.seen.add_(1)
