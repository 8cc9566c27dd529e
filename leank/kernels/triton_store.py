"""The decode step's cache update as one Triton launch per layer (CUDA, or the interpreter).

Program ``(b, h)`` of grid ``(B * H_kv,)`` does for KV head ``h`` of row ``b`` what
:meth:`leank.cache.LeanKLayer._step` does with torch ops (the reference): the token
``W`` positions back leaves ring slot ``seen % W`` — into the sink if it is among the
row's first ``S`` real tokens, and into the middle store (its kept K channels and its V)
if its middle slot exists — then the new token takes that slot. Writes that belong
nowhere are masked off rather than sent to the scratch slots. The caller then adds one to
``seen`` (every program reads it first, so the kernel itself cannot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contract import DecodeView


@triton.jit(do_not_specialize=["S", "RING", "SLOTS"])
def _store_step_kernel(
    K, V, stride_kb, stride_kh, stride_vb, stride_vh,
    SK, SV, stride_sb, stride_sh, S,
    RK, RV, stride_rb, stride_rh, RING,
    MK, MV, stride_mkb, stride_mvb, SLOTS,
    HEAD_C, HEAD_KOFF, HEAD_VOFF, HEAD_CHAN, PADS, SEEN, C0, H,
    D: tl.constexpr, DP: tl.constexpr, SINK_WRITE: tl.constexpr, MIDDLE: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs = tl.arange(0, DP)
    dmask = offs < D
    seen = tl.load(SEEN)
    pos = seen - RING  # the leaving token's position (< 0: the ring is not full yet)
    ring = b.to(tl.int64) * stride_rb + h.to(tl.int64) * stride_rh + (seen % RING) * D
    k_old = tl.load(RK + ring + offs, mask=dmask)
    v_old = tl.load(RV + ring + offs, mask=dmask)
    c = tl.load(HEAD_C + h)
    cmask = offs < c
    k_kept = tl.load(RK + ring + tl.load(HEAD_CHAN + h * D + offs, mask=cmask, other=0), mask=cmask)
    k_new = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs, mask=dmask)
    v_new = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + offs, mask=dmask)
    tl.debug_barrier()  # every read of the slot before it is overwritten
    if SINK_WRITE:
        s = pos - tl.load(PADS + b)
        if (pos >= 0) & (s >= 0) & (s < S):
            sink = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + s * D + offs
            tl.store(SK + sink, k_old, mask=dmask)
            tl.store(SV + sink, v_old, mask=dmask)
    if MIDDLE:
        i = pos - tl.load(C0)
        if (c > 0) & (pos >= 0) & (i >= 0) & (i < SLOTS - 1):
            k_at = tl.load(HEAD_KOFF + h).to(tl.int64) * SLOTS + i * c
            v_at = tl.load(HEAD_VOFF + h).to(tl.int64) * SLOTS * D + i * D
            tl.store(MK + b.to(tl.int64) * stride_mkb + k_at + offs, k_kept, mask=cmask)
            tl.store(MV + b.to(tl.int64) * stride_mvb + v_at + offs, v_old, mask=dmask)
    tl.store(RK + ring + offs, k_new, mask=dmask)
    tl.store(RV + ring + offs, v_new, mask=dmask)


def store_step_triton(key: torch.Tensor, value: torch.Tensor, view: DecodeView, *, sink_write: bool) -> None:
    """Store one new token per row (K/V ``[B, H_kv, 1, D]``) and count it (``seen += 1``)."""
    B, H, _, D = key.shape
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    rk, rv, sk = view.ring_k, view.ring_v, view.sink_k
    _store_step_kernel[(B * H,)](
        key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        sk, view.sink_v, sk.stride(0), sk.stride(1), view.sink,
        rk, rv, rk.stride(0), rk.stride(1), rk.shape[2],
        view.mid_k, view.mid_v, view.mid_k.stride(0), view.mid_v.stride(0), view.slots,
        view.head_c, view.head_koff, view.head_voff, view.head_chan, view.pads, view.seen, view.c0, H,
        D=D, DP=triton.next_power_of_2(D), SINK_WRITE=sink_write and view.sink > 0, MIDDLE=any(view.head_counts),
        num_warps=1,
    )
    view.seen.add_(1)
