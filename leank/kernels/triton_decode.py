"""Triton decode attention over a LeanK cache (one new token per row).

Two launches per layer. ``_leank_decode_kernel``, grid ``(B * H_kv, splits + 1)``: program ``(b, h, s)`` with
``s < splits`` attends the query heads of KV head ``h`` (packed into one tile, so
``tl.dot`` runs on tensor cores) to the ``s``-th slice of row ``b``'s compressed middle
tokens: it reads only the head's kept K channels (row stride ``c``) and its V. The kept
count is a runtime value from the per-head tables; it selects a tile width among the
powers of two (a compile-time constant per branch). Slices hold about the same bytes
(heads that keep more channels get shorter slices); heads that keep nothing skip the
middle. Program ``s == splits`` attends to the sink and window tokens (full K and V).
Each program writes an fp32 partial output and its log-sum-exp (base 2).
``_merge_kernel``, grid ``(B * H_q,)``, merges each query head's partials (loaded as one
tile) into one softmax and writes the output in the query's dtype. (Merging inside the
first kernel, by the last program of each head to finish, was measured slower at batch
1: its loop over ~100 partials is serial; see docs/LOG.md.)

Lengths are launch arguments that are not specialised on (no recompilation per length).
The workspace is a grow-only buffer per device, so a decode step allocates only its
output and does not synchronise with the host (it can be captured in a CUDA graph).

Under ``TRITON_INTERPRET=1`` (CPU tests) loaded values are cast to fp32 before any
arithmetic: the interpreter mishandles bf16 arithmetic.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ..errors import LeanKError

if TYPE_CHECKING:
    from ..cache import LeanKLayer

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
LOG2E = 1.4426950408889634
_NEG = tl.constexpr(-1.0e30)  # running-max start: finite, so exp2(m_old - m_new) never sees inf - inf


@triton.jit
def _attend(acc, m_i, l_i, q, qk_scale, k_ptrs_base, v_ptrs_base, k_stride, lo, hi, offs_kc, k_cols, offs_d,
            BLOCK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax accumulation over tokens ``[lo, hi)``. ``q`` ``[GP, KC]`` is the raw
    query (exact in the cache dtype); scores are scaled by ``qk_scale`` = ``scaling *
    log2(e)`` in fp32 after the dot. K rows have ``k_stride`` elements, of which the first
    ``k_cols`` are read; V rows are ``D`` wide."""
    D = offs_d.shape[0]
    for start in range(lo, hi, BLOCK):
        offs_n = start + tl.arange(0, BLOCK)
        valid = offs_n < hi
        rows = offs_n.to(tl.int64)
        k = tl.load(k_ptrs_base + rows[:, None] * k_stride + offs_kc[None, :],
                    mask=valid[:, None] & (offs_kc[None, :] < k_cols), other=0.0)
        v = tl.load(v_ptrs_base + rows[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _middle(acc, m_i, l_i, q_rows, gmask, chan, c, k_base, v_base, lo, hi, qk_scale, offs_d,
            KC: tl.constexpr, BLOCK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Middle tokens of one head keeping ``c <= KC`` channels: the query gathered at the
    kept channels ``[GP, KC]``, K rows ``c`` wide."""
    offs_kc = tl.arange(0, KC)
    cmask = offs_kc < c
    ch = tl.load(chan + offs_kc, mask=cmask, other=0)
    q = tl.load(q_rows[:, None] + ch[None, :], mask=gmask[:, None] & cmask[None, :], other=0.0)
    return _attend(acc, m_i, l_i, q, qk_scale, k_base, v_base, c, lo, hi, offs_kc, c, offs_d, BLOCK, UPCAST, PREC)


@triton.jit(do_not_specialize=["S", "W", "w0", "cap", "M", "c0", "budget", "NS"])
def _leank_decode_kernel(
    Q, stride_qb, stride_qh,
    SK, SV, stride_sb, stride_sh, S,
    WK, WV, stride_wb, stride_wh, W, w0,
    MK, MV, stride_mkb, stride_mvb, cap, M, c0, budget,
    HEAD_C, HEAD_KOFF, HEAD_VOFF, HEAD_CHAN,
    PADS, WS_O, WS_L, qk_scale, H, NS,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, KALIGN: tl.constexpr,
    HAS_SINK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    pad = tl.load(PADS + b).to(tl.int32)

    offs_g = tl.arange(0, GP)
    gmask = offs_g < G
    offs_d = tl.arange(0, D)
    q_rows = Q + b.to(tl.int64) * stride_qb + (h * G + offs_g).to(tl.int64) * stride_qh

    acc = tl.zeros([GP, D], dtype=tl.float32)
    m_i = tl.full([GP], _NEG, dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)

    if split == NS:
        # Sink and window: full K and V.
        q = tl.load(q_rows[:, None] + offs_d[None, :], mask=gmask[:, None], other=0.0)
        if HAS_SINK:
            n_sink = tl.minimum(tl.maximum(w0 - pad, 0), S)
            base = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, qk_scale, SK + base, SV + base, D, 0, n_sink, offs_d, D, offs_d,
                                    BLOCK, UPCAST, PREC)
        base = b.to(tl.int64) * stride_wb + h.to(tl.int64) * stride_wh
        w_lo = tl.maximum(pad - w0, 0)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, qk_scale, WK + base, WV + base, D, w_lo, W, offs_d, D, offs_d,
                                BLOCK, UPCAST, PREC)
    else:
        c = tl.load(HEAD_C + h)
        # Each program reads about `budget` elements: a head's split covers
        # budget / (c + D) tokens (rounded up to whole blocks), so heads that keep more
        # channels get more, shorter splits. Middle slot i is valid for this row iff
        # c0 + i >= pad + S (the row's sink is not there).
        split_len = tl.maximum(tl.cdiv(tl.cdiv(budget, c + D), BLOCK), 1) * BLOCK
        lo = tl.maximum(split * split_len, pad + S - c0)
        hi = tl.minimum(split * split_len + split_len, M)
        if c > 0:
            c = tl.multiple_of(c, KALIGN)
            koff = tl.multiple_of(tl.load(HEAD_KOFF + h).to(tl.int64) * cap, KALIGN)
            k_base = MK + b.to(tl.int64) * stride_mkb + koff
            v_base = MV + b.to(tl.int64) * stride_mvb + tl.load(HEAD_VOFF + h).to(tl.int64) * cap * D
            chan = HEAD_CHAN + h * D
            # The kept count picks a tile width (a compile-time constant): 16, 32, 64 or D.
            if c <= 16:
                acc, m_i, l_i = _middle(acc, m_i, l_i, q_rows, gmask, chan, c, k_base, v_base, lo, hi, qk_scale,
                                        offs_d, 16, BLOCK, UPCAST, PREC)
            elif c <= 32:
                acc, m_i, l_i = _middle(acc, m_i, l_i, q_rows, gmask, chan, c, k_base, v_base, lo, hi, qk_scale,
                                        offs_d, 32, BLOCK, UPCAST, PREC)
            elif c <= 64:
                acc, m_i, l_i = _middle(acc, m_i, l_i, q_rows, gmask, chan, c, k_base, v_base, lo, hi, qk_scale,
                                        offs_d, 64, BLOCK, UPCAST, PREC)
            else:
                acc, m_i, l_i = _middle(acc, m_i, l_i, q_rows, gmask, chan, c, k_base, v_base, lo, hi, qk_scale,
                                        offs_d, D, BLOCK, UPCAST, PREC)

    # Partial result of this program: o = acc / l and lse = m + log2(l) (-inf when empty).
    has = l_i > 0
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    rows = (bh * G + offs_g).to(tl.int64) * (NS + 1)
    tl.store(WS_O + (rows + split)[:, None] * D + offs_d[None, :], o, mask=gmask[:, None])
    tl.store(WS_L + rows + split, lse, mask=gmask)


@triton.jit
def _merge_kernel(WS_O, WS_L, OUT, stride_ob, stride_oh, HQ, NS1, D: tl.constexpr, SP: tl.constexpr):
    """One program per (row, query head): all partials loaded at once and merged."""
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    offs_s = tl.arange(0, SP)
    offs_d = tl.arange(0, D)
    smask = offs_s < NS1
    rows = pid.to(tl.int64) * NS1 + offs_s
    lse = tl.load(WS_L + rows, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)  # finite: the window always holds the new token
    w = tl.exp2(lse - m)
    o = tl.load(WS_O + rows[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh + offs_d, out.to(OUT.dtype.element_ty))


_WORKSPACE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, rows: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial outputs ``[rows, D]`` and LSEs ``[rows]``: one grow-only buffer per device
    (capacity in powers of two), shared by layers and steps (they run one after another on
    one stream), so a decode step allocates only its output."""
    o, lse = _WORKSPACE.get(device, (None, None))
    if o is None or o.numel() < rows * D:
        o = torch.empty(triton.next_power_of_2(rows * D), dtype=torch.float32, device=device)
        lse = torch.empty(o.numel() // D + 1, dtype=torch.float32, device=device)
        _WORKSPACE[device] = (o, lse)
    return o[: rows * D].view(rows, D), lse[:rows]


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def split_plan(
    batch: int, head_counts: list[int], middle: int, D: int, block: int, programs: int, budget: int | None = None
) -> tuple[int, int]:
    """(budget, splits): elements each middle program reads, so that the middle work of all
    rows and heads (tokens × (kept + D) per head) spreads over about ``programs`` programs
    (or the given ``budget``), and the number of splits of the head keeping most channels
    (the most any head needs: the grid's second axis, sink/window program excluded)."""
    kept = [c for c in head_counts if c > 0]
    if not kept or middle == 0:
        return 1, 1
    if budget is None:
        total = batch * middle * sum(c + D for c in kept)
        budget = max(triton.cdiv(total, programs), 2 * block * (min(kept) + D))
    split_len = triton.cdiv(triton.cdiv(budget, max(kept) + D), block) * block  # the shortest splits
    return budget, triton.cdiv(middle, split_len)


def kernel_config(D: int) -> tuple[int, int, int, float]:
    """(block, warps, stages, waves); ``LEANK_TRITON_CONFIG="block,warps,stages,waves"`` overrides."""
    env = os.environ.get("LEANK_TRITON_CONFIG")
    if env:
        block, warps, stages, waves = env.split(",")
        return int(block), int(warps), int(stages), float(waves)
    return (64, 4, 2, 4.0) if D <= 128 else (32, 4, 2, 4.0)


def check_layer(query: torch.Tensor, layer: LeanKLayer) -> None:
    B, Hq, q, D = query.shape
    if q != 1:
        raise LeanKError(f"the triton LeanK kernel decodes one token per row, got {q}: use the torch backend")
    if D not in (64, 128, 256):
        raise LeanKError(f"the triton LeanK kernel supports head_dim 64, 128 and 256, got {D}: use the torch backend")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LeanKError(f"the triton LeanK kernel supports fp16, bf16 and fp32, got {query.dtype}")
    if layer.pads is None:
        raise LeanKError("the LeanK cache holds no prompt yet: decode attention needs a prefilled cache")
    if not query.is_cuda and not INTERPRET:
        raise LeanKError("the triton LeanK kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def decode_attention_triton(
    query: torch.Tensor, layer: LeanKLayer, scaling: float, *, out: torch.Tensor | None = None,
    budget_override: int | None = None,
) -> torch.Tensor:
    """LeanK attention of one new token per row, ``query`` ``[B, H_q, 1, D]`` → ``[B, H_q, 1, D]``.

    ``out``: where to write (contiguous ``[B, H_q, 1, D]``); ``budget_override``: elements per
    middle program instead of :func:`split_plan`'s (tests use it to force many splits)."""
    check_layer(query, layer)
    B, Hq, _, D = query.shape
    H = layer.num_kv_heads
    G = Hq // H
    query = query if query.stride(-1) == 1 else query.contiguous()
    M = layer.middle_len
    block, warps, stages, waves = kernel_config(D)
    programs = int(waves * _sm_count(query.device))
    budget, ns = split_plan(B, layer.head_counts, M, D, block, programs, budget_override)
    ws_o, ws_l = _workspace(query.device, B * Hq * (ns + 1), D)
    if out is None:
        out = torch.empty(B, Hq, 1, D, dtype=query.dtype, device=query.device)

    head_c, head_koff, head_voff, head_chan = layer.head_tables
    kalign = math.gcd(*layer.head_counts) or 16
    kalign = kalign & -kalign  # largest power of two dividing every kept count
    wk, wv = layer.window_k, layer.window_v
    sk, sv = (layer.sink_k, layer.sink_v) if layer.sink_k is not None else (wk, wv)
    mk, mv = (layer.mid_k, layer.mid_v) if layer.mid_k is not None else (wk, wv)
    cap = layer.middle_capacity()
    _leank_decode_kernel[(B * H, ns + 1)](
        query, query.stride(0), query.stride(1),
        sk, sv, sk.stride(0), sk.stride(1), layer.sink,
        wk, wv, wk.stride(0), wk.stride(1), layer.window_len, layer.w0,
        mk, mv, mk.stride(0), mv.stride(0), cap, M, layer.c0, budget,
        head_c, head_koff, head_voff, head_chan,
        layer.pads, ws_o, ws_l, scaling * LOG2E, H, ns,
        G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BLOCK=block, KALIGN=min(kalign, 16),
        HAS_SINK=layer.sink_k is not None, UPCAST=INTERPRET or query.dtype == torch.float32,
        PREC="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )
    _merge_kernel[(B * Hq,)](ws_o, ws_l, out, out.stride(0), out.stride(1), Hq, ns + 1, D=D,
                             SP=triton.next_power_of_2(ns + 1), num_warps=4)
    return out
