"""Triton decode attention over a LeanK cache's :class:`~leank.contract.DecodeView` (one new token per row).

Two launches per layer. ``_leank_decode_kernel``, grid ``(B * H_kv, splits + 1)``: program
``(b, h, s)`` with ``s < splits`` attends the query heads of KV head ``h`` (packed into one
tile, so ``tl.dot`` runs on tensor cores) to the ``s``-th slice of row ``b``'s compressed
middle tokens: it reads only the head's kept K channels (row stride ``c``) and its V. The
kept count is a runtime value from the per-head tables; it selects a tile width among the
powers of two (a compile-time constant per branch). Slices hold about the same bytes (heads
that keep more channels get shorter slices); heads that keep nothing skip the middle.
Program ``s == splits`` attends to the sink and the ring (full K and V; ring position ``p``
in slot ``p % W``). Each program writes an fp32 partial output and its log-sum-exp (base 2).
``_merge_kernel``, grid ``(B * H_q,)``, merges each query head's partials into one softmax
and writes the output in the query's dtype. (Merging inside the first kernel, by the last
program of each head to finish, was measured slower at batch 1; see docs/LOG.md.)

Lengths are read from device memory (``seen``, ``c0``, ``pads``) and the grid is fixed for a
cache's life (:func:`plan`: the split length follows the middle length inside the kernel),
so one compiled kernel and one captured CUDA graph serve every step: no recompilation, no
host value, no allocation besides the step's workspace and output. The plan's per-layer values
are runtime arguments too, so the layers of a model share one compiled kernel.

The model's score terms (:mod:`leank.contract`): ``scaling``; soft-capping
``cap * tanh(score / cap)`` after the dot (``HAS_CAP``; tanh from ``exp``, with a short odd
series near 0 where ``1 - exp(-2|x|)`` would cancel); learned sinks in the merge (one more
term ``exp(sink)`` in each query head's denominator, no value). A ``head_dim`` that is not a
power of two (96) is padded to the next one in the tiles, the padding lanes masked.

A quantised middle store (``QBITS`` 8 or 4; :mod:`leank.quant`) is dequantised in the
middle programs' loads: codes (a byte, or a nibble of one) and the group's scale and zero
are read and ``zero + code * scale`` computed before the dot, in the same tiles (int8: in fp32;
int4: in the cache dtype from codes made numbers by their exponent bits, :func:`_dequant_halves`). int4
reads each row's bytes as a vector and keeps the low and high nibbles apart: the dots are split
by parity (:func:`_attend_int4_split`), so no register tile is ever interleaved (3.2–4.5× faster
on an H200 than loading a byte per lane and shifting; interleaving the nibbles with ``tl.join``
gave wrong tiles on an H200, docs/LOG.md), and each block's bytes are loaded while the previous block
is computed. Its tiles are 32 wide or more (heads keeping 16 channels or fewer take the 32-wide one),
so each half is 16+.

Under ``TRITON_INTERPRET=1`` (CPU tests) loaded values are cast to fp32 before any
arithmetic: the interpreter mishandles bf16 arithmetic.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..contract import DecodeView
from ..errors import LeanKError
from .triton_store import quant_args, row_bytes, row_params

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
LOG2E = 1.4426950408889634
_NEG = tl.constexpr(-1.0e30)  # running-max start: finite, so exp2(m_old - m_new) never sees inf - inf
HEAD_DIMS = (64, 96, 128, 256)


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp (portable: no libdevice), odd series below |x| = 1/8."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = a * a
    small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.125, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _load_params(params, rows, valid, row_params, NP: tl.constexpr):
    """The first ``NP`` scale/zero entries of each of a tile's rows ``[len(rows), NP]``, as stored: one vector
    load per row (entries past ``row_params`` and rows not ``valid`` come out 0)."""
    offs_p = tl.arange(0, NP)
    return tl.load(params + rows[:, None] * row_params + offs_p[None, :],
                   mask=valid[:, None] & (offs_p[None, :] < row_params), other=0.0)


@triton.jit
def _split_params(pairs, NG: tl.constexpr, SYM: tl.constexpr):
    """Per-group scales and zeros ``[rows, NG]`` of rows of (scale, zero) pairs (``SYM``: scales; the zeros
    returned are the scales again, unused)."""
    if SYM:
        scale, zero = pairs, pairs
    else:
        scale, zero = tl.split(tl.reshape(pairs, (pairs.shape[0], NG, 2)))
    return scale, zero


@triton.jit
def _group_params(params, rows, valid, row_params, NG: tl.constexpr, SYM: tl.constexpr):
    """Per-group fp32 scales and zeros ``[len(rows), NG]`` of a tile's rows (:func:`_split_params`)."""
    PPG: tl.constexpr = 1 if SYM else 2  # params per group: (scale, zero), or the scale alone
    return _split_params(_load_params(params, rows, valid, row_params, PPG * NG).to(tl.float32), NG, SYM)


@triton.jit
def _affine(code, scale, zero, QBITS: tl.constexpr, SYM: tl.constexpr):
    """Dequantised values of fp32 codes ``[rows, groups, per group]`` with their groups' ``scale``
    and ``zero`` ``[rows, groups]``: ``zero + code · scale``, or ``(code - 2^(bits-1)) · scale``
    when ``SYM`` (``leank.quant.dequantize``)."""
    if SYM:
        x = (code - (1 << (QBITS - 1))) * scale[:, :, None]
    else:
        x = zero[:, :, None] + code * scale[:, :, None]
    return x


@triton.jit
def _dequant(codes, params, rows, valid, cols, n, row_bytes, row_params, QBITS: tl.constexpr, GROUP: tl.constexpr,
             SYM: tl.constexpr):
    """fp32 values ``[len(rows), len(cols)]`` (``cols`` = ``arange(0, NCOL)``) of int8 rows:
    ``row_bytes`` code bytes and ``row_params`` scale/zero entries per row, ``n`` values. Rows not
    ``valid`` and groups past the row come out 0; columns from ``n`` on inside the row's last group
    come out as code 0 dequantised (its zero; symmetric: ``-2^(bits-1)`` scales) — harmless: the query
    is 0 at those K columns, and V lanes from D on are never written out. A row's codes load as one
    contiguous run of bytes, its (scale, zero) pairs (``SYM``: scales) as one run, broadcast over
    their groups in registers. (int4 rows: :func:`_dequant_halves`.)"""
    tl.static_assert(QBITS == 8)
    BLOCK: tl.constexpr = rows.shape[0]
    NCOL: tl.constexpr = cols.shape[0]
    GW: tl.constexpr = GROUP if GROUP < NCOL else NCOL  # values per scale within this tile
    NG: tl.constexpr = NCOL // GW
    scale, zero = _group_params(params, rows, valid, row_params, NG, SYM)
    code = tl.load(codes + rows[:, None] * row_bytes + cols[None, :], mask=valid[:, None] & (cols[None, :] < n),
                   other=0).to(tl.float32)
    return tl.reshape(_affine(tl.reshape(code, (BLOCK, NG, GW)), scale, zero, QBITS, SYM), (BLOCK, NCOL))


@triton.jit
def _softmax_step(s, valid, m_i, l_i, qk_scale, cap_scale, HAS_CAP: tl.constexpr):
    """One online-softmax step over a tile of raw dot products ``s`` ``[GP, BLOCK]`` (columns not
    ``valid`` masked): the scores scaled (or soft-capped) into base 2, then the tile's weights
    ``p``, the factor ``alpha`` that rescales what was accumulated, and the new running max and sum."""
    if HAS_CAP:
        s = _tanh(s * cap_scale) * qk_scale
    else:
        s = s * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attend(acc, m_i, l_i, q, qk_scale, cap_scale, k_ptrs_base, v_ptrs_base, k_stride, lo, hi, offs_kc, k_cols,
            offs_d, D, WRAP, RINGED: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr,
            UPCAST: tl.constexpr, PREC: tl.constexpr, kp_base=None, vp_base=None, kp_stride=0,
            QBITS: tl.constexpr = 0, GROUP: tl.constexpr = 1, SYM: tl.constexpr = False):
    """Online-softmax accumulation over tokens ``[lo, hi)``. ``q`` ``[GP, KC]`` is the raw
    query (exact in the cache dtype); scores are scaled in fp32 after the dot: by ``qk_scale``
    = ``scaling * log2(e)``, or with ``HAS_CAP`` to ``tanh(dot * cap_scale) * qk_scale``
    (``cap_scale`` = ``scaling / cap``, ``qk_scale`` = ``cap * log2(e)``). K rows have
    ``k_stride`` elements, of which the first ``k_cols`` are read; V rows are ``D`` wide (lanes
    ``offs_d >= D`` are padding). Token ``n`` is row ``n % WRAP`` of a ring buffer when
    ``RINGED``, else row ``n``. ``QBITS > 0``: K and V rows are quantised (``k_stride`` code
    bytes and ``kp_stride`` params per K row, ``kp_base``/``vp_base`` their params)."""
    dmask = offs_d < D
    for start in range(lo, hi, BLOCK):
        offs_n = start + tl.arange(0, BLOCK)
        valid = offs_n < hi
        if RINGED:
            rows = (offs_n % WRAP).to(tl.int64)
        else:
            rows = offs_n.to(tl.int64)
        kmask = valid[:, None] & (offs_kc[None, :] < k_cols)
        vmask = valid[:, None] & dmask[None, :]
        if QBITS > 0:
            VB = row_bytes(D, QBITS)
            VP = row_params(D, GROUP, SYM)
            k = _dequant(k_ptrs_base, kp_base, rows, valid, offs_kc, k_cols, k_stride, kp_stride, QBITS, GROUP, SYM)
            v = _dequant(v_ptrs_base, vp_base, rows, valid, offs_d, D, VB, VP, QBITS, GROUP, SYM)
            if not UPCAST:
                k = k.to(q.dtype)
                v = v.to(q.dtype)
        else:
            k = tl.load(k_ptrs_base + rows[:, None] * k_stride + offs_kc[None, :], mask=kmask, other=0.0)
            v = tl.load(v_ptrs_base + rows[:, None] * D + offs_d[None, :], mask=vmask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
        s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=PREC)
        p, alpha, m_i, l_i = _softmax_step(s, valid, m_i, l_i, qk_scale, cap_scale, HAS_CAP)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_i, l_i


@triton.jit
def _int4_rows(codes, params, rows, valid, NCOL: tl.constexpr, row_bytes, row_params, GROUP: tl.constexpr,
               SYM: tl.constexpr):
    """The raw int4 rows of a tile, for :func:`_dequant_halves`: each row's ``NCOL / 2`` code bytes as one
    vector load, and its (scale, zero) pairs (``SYM``: scales) as one run, in the store's dtype."""
    GW: tl.constexpr = GROUP if GROUP < NCOL else NCOL
    NP: tl.constexpr = (1 if SYM else 2) * (NCOL // GW)
    offs_b = tl.arange(0, NCOL // 2)
    byte = tl.load(codes + rows[:, None] * row_bytes + offs_b[None, :],
                   mask=valid[:, None] & (offs_b[None, :] < row_bytes), other=0)
    return byte, _load_params(params, rows, valid, row_params, NP)


@triton.jit
def _dequant_halves(byte, pairs, NCOL: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, DT: tl.constexpr):
    """int4 rows (:func:`_int4_rows`) as two ``DT`` tiles ``[rows, NCOL / 2]``: values ``0, 2, 4, …`` (the
    low nibbles) and ``1, 3, 5, …`` (the high ones) — no interleaving: the caller uses the halves apart
    (the dots split by parity). Groups as in :func:`_dequant` (value ``2j`` and ``2j + 1`` share a group:
    groups are even).

    In fp16/bf16 a code becomes a number without a conversion instruction: ``BITS | code``, read as
    ``DT``, is ``base + code`` (``base`` = 1024 in fp16, 128 in bf16, where the spacing is 1), and
    subtracting ``base`` (and the symmetric offset 8) is exact; the scale is then applied in ``DT`` (one
    rounding of the exact value, as rounding the fp32 value gives — fp32 has more than twice the bits; with
    a zero point through an explicit fused multiply-add, so this holds whatever Triton's FP-fusion default).
    fp32 (``UPCAST``): converted."""
    BLOCK: tl.constexpr = byte.shape[0]
    HALF: tl.constexpr = NCOL // 2
    GW: tl.constexpr = GROUP if GROUP < NCOL else NCOL
    NG: tl.constexpr = NCOL // GW
    scale, zero = _split_params(pairs.to(DT), NG, SYM)
    if DT == tl.float32:
        byte = byte.to(tl.int32)
        lo = _affine(tl.reshape((byte & 15).to(tl.float32), (BLOCK, NG, GW // 2)), scale, zero, 4, SYM)
        hi = _affine(tl.reshape((byte >> 4).to(tl.float32), (BLOCK, NG, GW // 2)), scale, zero, 4, SYM)
    else:
        BITS: tl.constexpr = 0x6400 if DT == tl.float16 else 0x4300
        OFF: tl.constexpr = (1024.0 if DT == tl.float16 else 128.0) + (8.0 if SYM else 0.0)
        lo = ((byte & 15).to(tl.int16) | BITS).to(DT, bitcast=True) - OFF
        hi = ((byte >> 4).to(tl.int16) | BITS).to(DT, bitcast=True) - OFF
        lo = tl.reshape(lo, (BLOCK, NG, GW // 2))
        hi = tl.reshape(hi, (BLOCK, NG, GW // 2))
        if SYM:
            lo, hi = lo * scale[:, :, None], hi * scale[:, :, None]
        else:
            lo, hi = tl.fma(lo, scale[:, :, None], zero[:, :, None]), tl.fma(hi, scale[:, :, None], zero[:, :, None])
    return tl.reshape(lo, (BLOCK, HALF)), tl.reshape(hi, (BLOCK, HALF))


@triton.jit
def _attend_int4_split(m_i, l_i, q_rows, gmask, chan, c, qk_scale, cap_scale, k_base, v_base, kp_base,
                       vp_base, kb, lo, hi, D, o_rows, KC: tl.constexpr, DP: tl.constexpr, HAS_CAP: tl.constexpr,
                       BLOCK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, GROUP: tl.constexpr,
                       SYM: tl.constexpr, GP: tl.constexpr):
    """:func:`_attend` over an int4 middle store with every dot split by parity: the score is
    ``q_even · K_even + q_odd · K_odd`` (the query gathered at the kept channels ``0, 2, …`` and
    ``1, 3, …``), and ``P · V`` accumulates into even and odd output columns apart. The codes load
    as vectors of bytes and are never interleaved in registers; the program's partial output is
    written here, the two halves to the even and odd columns of its workspace rows ``o_rows``
    (``[GP]`` pointers), so the caller writes only the log-sum-exp. Needs ``KC >= 32`` (dots of 16+).
    The next block's bytes are loaded before this block is computed: Triton's pipeliner stages only
    loads that feed a dot as they are (the plain path's, two blocks deep), and these are dequantised
    first, so without this each block waits for its own loads (8 × 32K on an H200: 7.02 → 6.15 ms)."""
    KH: tl.constexpr = KC // 2
    VH: tl.constexpr = DP // 2
    offs_h = tl.arange(0, KH)
    even, odd = 2 * offs_h < c, 2 * offs_h + 1 < c
    ch = tl.load(chan + 2 * offs_h, mask=even, other=0)
    q_e = tl.load(q_rows[:, None] + ch[None, :], mask=gmask[:, None] & even[None, :], other=0.0)
    ch = tl.load(chan + 2 * offs_h + 1, mask=odd, other=0)
    q_o = tl.load(q_rows[:, None] + ch[None, :], mask=gmask[:, None] & odd[None, :], other=0.0)
    if UPCAST:
        q_e, q_o = q_e.to(tl.float32), q_o.to(tl.float32)
    kp_stride = row_params(c, GROUP, SYM)
    vb, vp = row_bytes(D, 4), row_params(D, GROUP, SYM)
    acc_e = tl.zeros([GP, VH], dtype=tl.float32)
    acc_o = tl.zeros([GP, VH], dtype=tl.float32)
    offs_n = lo + tl.arange(0, BLOCK)
    rows = offs_n.to(tl.int64)
    kbyte, kpar = _int4_rows(k_base, kp_base, rows, offs_n < hi, KC, kb, kp_stride, GROUP, SYM)
    vbyte, vpar = _int4_rows(v_base, vp_base, rows, offs_n < hi, DP, vb, vp, GROUP, SYM)
    for start in range(lo, hi, BLOCK):
        offs_n = start + tl.arange(0, BLOCK)
        valid = offs_n < hi
        nxt = (offs_n + BLOCK).to(tl.int64)
        nkbyte, nkpar = _int4_rows(k_base, kp_base, nxt, offs_n + BLOCK < hi, KC, kb, kp_stride, GROUP, SYM)
        nvbyte, nvpar = _int4_rows(v_base, vp_base, nxt, offs_n + BLOCK < hi, DP, vb, vp, GROUP, SYM)
        k_e, k_o = _dequant_halves(kbyte, kpar, KC, GROUP, SYM, q_e.dtype)
        v_e, v_o = _dequant_halves(vbyte, vpar, DP, GROUP, SYM, q_e.dtype)
        s = tl.dot(q_e, tl.trans(k_e), input_precision=PREC)
        s = tl.dot(q_o, tl.trans(k_o), s, input_precision=PREC)
        p, alpha, m_i, l_i = _softmax_step(s, valid, m_i, l_i, qk_scale, cap_scale, HAS_CAP)
        acc_e = acc_e * alpha[:, None] + tl.dot(p.to(v_e.dtype), v_e, input_precision=PREC)
        acc_o = acc_o * alpha[:, None] + tl.dot(p.to(v_o.dtype), v_o, input_precision=PREC)
        kbyte, kpar, vbyte, vpar = nkbyte, nkpar, nvbyte, nvpar
    has = l_i > 0
    inv = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)[:, None]
    cols = 2 * tl.arange(0, VH)
    tl.store(o_rows[:, None] + cols[None, :], acc_e * inv, mask=gmask[:, None])
    tl.store(o_rows[:, None] + cols[None, :] + 1, acc_o * inv, mask=gmask[:, None])
    return m_i, l_i


@triton.jit
def _middle(acc, m_i, l_i, q_rows, gmask, chan, c, k_base, v_base, lo, hi, qk_scale, cap_scale, offs_d, D,
            KC: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr, UPCAST: tl.constexpr,
            PREC: tl.constexpr, kp_base, vp_base, kb, QBITS: tl.constexpr, GROUP: tl.constexpr,
            SYM: tl.constexpr, DP: tl.constexpr, o_rows, written):
    """Middle tokens of one head keeping ``c <= KC`` channels: the query gathered at the
    kept channels ``[GP, KC]``, K rows ``kb`` wide (``c`` values; quantised: ``ceil(c * QBITS / 8)`` code bytes).
    int4 (tiles of 32+): :func:`_attend_int4_split`, which writes the partial output itself
    (``written`` comes back true: the caller then writes only the log-sum-exp)."""
    offs_kc = tl.arange(0, KC)
    cmask = offs_kc < c
    ch = tl.load(chan + offs_kc, mask=cmask, other=0)
    q = tl.load(q_rows[:, None] + ch[None, :], mask=gmask[:, None] & cmask[None, :], other=0.0)
    # One return after a compile-time if/else: an early return inside the ``if`` would still
    # compile the plain path below it for 8-bit pointers (tl.dot then refuses K < 32).
    if QBITS == 4:
        m_i, l_i = _attend_int4_split(m_i, l_i, q_rows, gmask, chan, c, qk_scale, cap_scale, k_base, v_base, kp_base,
                                      vp_base, kb, lo, hi, D, o_rows, KC, DP, HAS_CAP, BLOCK, UPCAST, PREC, GROUP,
                                      SYM, acc.shape[0])
        written = written | True
    elif QBITS > 0:
        if UPCAST:
            q = q.to(tl.float32)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, qk_scale, cap_scale, k_base, v_base, kb, lo, hi,
                                offs_kc, c, offs_d, D, 1, False, HAS_CAP, BLOCK, UPCAST, PREC, kp_base, vp_base,
                                row_params(c, GROUP, SYM), QBITS, GROUP, SYM)
    else:
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, qk_scale, cap_scale, k_base, v_base, kb, lo, hi, offs_kc, c, offs_d,
                                D, 1, False, HAS_CAP, BLOCK, UPCAST, PREC)
    return acc, m_i, l_i, written


@triton.jit(do_not_specialize=["S", "RING", "SLOTS", "B_ROWS", "NS", "SUMCD", "MAXCD", "MIN_BUDGET", "PROGRAMS"])
def _leank_decode_kernel(
    Q, stride_qb, stride_qh,
    SK, SV, stride_sb, stride_sh, S,
    RK, RV, stride_rb, stride_rh, RING,
    MK, MV, stride_mkb, stride_mvb, SLOTS,
    HEAD_C, HEAD_KOFF, HEAD_VOFF, HEAD_CHAN,
    PADS, SEEN, C0, WS_O, WS_L, qk_scale, cap_scale, H, NS, B_ROWS,
    MKP, MVP, stride_mkpb, stride_mvpb, HEAD_KPOFF,
    SUMCD, MAXCD, MIN_BUDGET, PROGRAMS,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
    KALIGN: tl.constexpr, HAS_SINK: tl.constexpr, HAS_CAP: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr, QBITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    pad = tl.load(PADS + b)
    seen = tl.load(SEEN)
    n_out = seen - RING  # positions below this have left the ring (sink or middle)

    offs_g = tl.arange(0, GP)
    gmask = offs_g < G
    offs_d = tl.arange(0, DP)  # D lanes, padded to a power of two
    q_rows = Q + b.to(tl.int64) * stride_qb + (h * G + offs_g).to(tl.int64) * stride_qh

    acc = tl.zeros([GP, DP], dtype=tl.float32)
    m_i = tl.full([GP], _NEG, dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    ws_rows = (bh * G + offs_g).to(tl.int64) * (NS + 1) + split  # this program's workspace rows
    written = tl.zeros([], dtype=tl.int1)  # true when the middle pass wrote its partial output itself

    if split == NS:
        # Sink and ring: full K and V. Ring position p lives in slot p % RING.
        q = tl.load(q_rows[:, None] + offs_d[None, :], mask=gmask[:, None] & (offs_d[None, :] < D), other=0.0)
        if HAS_SINK:
            n_sink = tl.minimum(tl.maximum(n_out - pad, 0), S)
            base = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, qk_scale, cap_scale, SK + base, SV + base, D, 0, n_sink, offs_d,
                                    D, offs_d, D, 1, False, HAS_CAP, BLOCK, UPCAST, PREC)
        base = b.to(tl.int64) * stride_rb + h.to(tl.int64) * stride_rh
        r_lo = tl.maximum(tl.maximum(n_out, pad), 0)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, qk_scale, cap_scale, RK + base, RV + base, D, r_lo, seen, offs_d,
                                D, offs_d, D, RING, True, HAS_CAP, BLOCK, UPCAST, PREC)
    else:
        c = tl.load(HEAD_C + h)
        c0 = tl.load(C0)
        M = tl.maximum(n_out - c0, 0)
        # Each program reads about `budget` elements: a head's split covers budget / (c + D)
        # tokens (whole blocks), so heads that keep more channels get more, shorter splits.
        # The budget follows the middle length (no host value, no recompilation), and is
        # raised where needed so that the head keeping most channels fits in NS splits.
        # Runtime values (one compiled kernel for every layer of a model); int64: rows x tokens x
        # (kept + D) passes 2^31 at e.g. 64 x 32K.
        budget = tl.maximum(tl.cdiv(B_ROWS.to(tl.int64) * M * SUMCD, PROGRAMS), MIN_BUDGET)
        longest = tl.maximum(tl.cdiv(tl.cdiv(budget, MAXCD), BLOCK), tl.cdiv(tl.cdiv(M, NS), BLOCK)) * BLOCK
        budget = tl.maximum(budget, longest * MAXCD)
        split_len = (tl.maximum(tl.cdiv(tl.cdiv(budget, c + D), BLOCK), 1) * BLOCK).to(tl.int32)  # <= M + BLOCK
        # Middle slot i is valid for this row iff c0 + i >= pad + S (the row's sink is not there).
        lo = tl.maximum(split * split_len, pad + S - c0)
        hi = tl.minimum(split * split_len + split_len, M)
        if c > 0:
            c = tl.multiple_of(c, KALIGN)
            voff = tl.load(HEAD_VOFF + h).to(tl.int64) * SLOTS
            if QBITS > 0:  # offsets in code bytes / params (leank.contract)
                koff = tl.load(HEAD_KOFF + h).to(tl.int64) * SLOTS
                kb = row_bytes(c, QBITS)  # code bytes per K row
                row = b.to(tl.int64) * stride_mkb
                if KALIGN * QBITS % 8 == 0:  # every head's row bytes, so its offset and the row stride, multiples
                    koff = tl.multiple_of(koff, KALIGN * QBITS // 8)
                    kb = tl.multiple_of(c * QBITS // 8, KALIGN * QBITS // 8)
                    # On the product: the launcher makes a stride of 1 a constant (a store with no middle,
                    # never read here); the stride itself is slots x the heads' row bytes.
                    row = tl.multiple_of(row, KALIGN * QBITS // 8)
                k_base = MK + row + koff
                v_base = MV + b.to(tl.int64) * stride_mvb + voff * row_bytes(D, QBITS)
                kp_base = MKP + b.to(tl.int64) * stride_mkpb + tl.load(HEAD_KPOFF + h).to(tl.int64) * SLOTS
                vp_base = MVP + b.to(tl.int64) * stride_mvpb + voff * row_params(D, GROUP, SYM)
            else:
                koff = tl.multiple_of(tl.load(HEAD_KOFF + h).to(tl.int64) * SLOTS, KALIGN)
                k_base = MK + b.to(tl.int64) * stride_mkb + koff
                v_base = MV + b.to(tl.int64) * stride_mvb + voff * D
                kp_base = MK
                vp_base = MV
                kb = c
            chan = HEAD_CHAN + h * D
            # The kept count picks a tile width (a compile-time constant): 16, 32, 64 or DP. int4 starts
            # at 32: its reads split tiles by parity, and a dot needs halves of 16+.
            SMALL: tl.constexpr = 32 if QBITS == 4 else 16
            if c <= SMALL:
                acc, m_i, l_i, written = _middle(
                    acc, m_i, l_i, q_rows, gmask, chan, c, k_base, v_base, lo, hi, qk_scale, cap_scale, offs_d, D,
                    SMALL, HAS_CAP, BLOCK, UPCAST, PREC, kp_base, vp_base, kb, QBITS, GROUP, SYM, DP,
                    WS_O + ws_rows * DP, written)
            elif c <= 32:
                acc, m_i, l_i, written = _middle(
                    acc, m_i, l_i, q_rows, gmask, chan, c, k_base, v_base, lo, hi, qk_scale, cap_scale, offs_d, D,
                    32, HAS_CAP, BLOCK, UPCAST, PREC, kp_base, vp_base, kb, QBITS, GROUP, SYM, DP,
                    WS_O + ws_rows * DP, written)
            elif c <= 64:
                acc, m_i, l_i, written = _middle(
                    acc, m_i, l_i, q_rows, gmask, chan, c, k_base, v_base, lo, hi, qk_scale, cap_scale, offs_d, D,
                    64, HAS_CAP, BLOCK, UPCAST, PREC, kp_base, vp_base, kb, QBITS, GROUP, SYM, DP,
                    WS_O + ws_rows * DP, written)
            else:
                acc, m_i, l_i, written = _middle(
                    acc, m_i, l_i, q_rows, gmask, chan, c, k_base, v_base, lo, hi, qk_scale, cap_scale, offs_d, D,
                    DP, HAS_CAP, BLOCK, UPCAST, PREC, kp_base, vp_base, kb, QBITS, GROUP, SYM, DP,
                    WS_O + ws_rows * DP, written)

    # Partial result of this program: o = acc / l and lse = m + log2(l) (-inf when empty).
    has = l_i > 0
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(WS_O + ws_rows[:, None] * DP + offs_d[None, :], o, mask=gmask[:, None] & ~written)
    tl.store(WS_L + ws_rows, lse, mask=gmask)


@triton.jit
def _merge_kernel(WS_O, WS_L, SINKS, OUT, stride_ob, stride_oh, HQ, NS1, D: tl.constexpr, DP: tl.constexpr,
                  SP: tl.constexpr, HAS_SINKS: tl.constexpr):
    """One program per (row, query head): all partials loaded at once and merged (with the
    head's learned sink logit, ``SINKS`` fp32 ``[H_q]`` in base 2, as a term without value)."""
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    offs_s = tl.arange(0, SP)
    offs_d = tl.arange(0, DP)
    smask = offs_s < NS1
    rows = pid.to(tl.int64) * NS1 + offs_s
    lse = tl.load(WS_L + rows, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)  # finite: the window always holds the new token
    if HAS_SINKS:
        sink = tl.load(SINKS + hq)
        m = tl.maximum(m, sink)
    w = tl.exp2(lse - m)
    denom = tl.sum(w, 0)
    if HAS_SINKS:
        denom += tl.exp2(sink - m)
    o = tl.load(WS_O + rows[:, None] * DP + offs_d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / denom
    tl.store(OUT + b.to(tl.int64) * stride_ob + hq.to(tl.int64) * stride_oh + offs_d, out.to(OUT.dtype.element_ty),
             mask=offs_d < D)


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def kernel_config(D: int, quantised: bool = False) -> tuple[int, int, int, float]:
    """(block, warps, stages, waves); ``LEANK_TRITON_CONFIG="block,warps,stages,waves"`` overrides (for
    plain and quantised stores alike: a configuration swept on one is not the other's best).

    A quantised store's kernel fits 3 programs per SM (registers, shared memory), so its waves are
    a multiple of 3: 6 waves ran 10-19% faster than 4 for int4s and int8 at 8 x 32K and 1 x 128K on
    an H200 (``benchmarks/results/decode_kernel_quant_h200/session10/``)."""
    env = os.environ.get("LEANK_TRITON_CONFIG")
    if env:
        block, warps, stages, waves = env.split(",")
        return int(block), int(warps), int(stages), float(waves)
    waves = 6.0 if quantised else 4.0
    return (64, 4, 2, waves) if D <= 128 else (32, 4, 2, waves)


@dataclass(frozen=True)
class Plan:
    """Launch constants of one layer shape, fixed for the cache's life (so a captured graph
    stays valid): the grid's split count and the numbers the kernel sizes splits with."""

    splits: int  # middle programs per (row, KV head); the grid's second axis is splits + 1
    programs: int  # middle programs the work is spread over
    sum_cd: int  # sum over heads keeping channels of (kept + D): elements per middle token
    max_cd: int  # the largest (kept + D)
    min_budget: int  # elements per program at least (two blocks of the head keeping fewest)
    block: int
    warps: int
    stages: int
    kalign: int  # largest power of two (<= 16) dividing every kept count


def plan(batch: int, head_counts: tuple[int, ...], D: int, slots: int, sm_count: int,
         programs: int | None = None, quantised: bool = False) -> Plan:
    """The :class:`Plan` for ``batch`` rows of heads keeping ``head_counts`` channels. The
    kernel spreads the middle tokens of all rows and heads over about ``programs`` programs
    (default: ``waves`` per SM); ``splits`` is what the head keeping most channels needs
    then, independent of the middle length (tests pass a large ``programs`` to force many)."""
    return _plan(batch, head_counts, D, slots, sm_count, programs, kernel_config(D, quantised))


@functools.lru_cache(maxsize=256)
def _plan(batch, head_counts, D, slots, sm_count, programs, config) -> Plan:
    block, warps, stages, waves = config
    programs = programs or int(waves * sm_count)
    kept = [c for c in head_counts if c > 0]
    kalign = math.gcd(*head_counts) or 16
    kalign = min(kalign & -kalign, 16)
    if not kept:
        return Plan(1, programs, 1, 1, 1, block, warps, stages, kalign)
    sum_cd, max_cd = sum(c + D for c in kept), max(kept) + D
    splits = max(1, min(triton.cdiv(programs * max_cd, batch * sum_cd), triton.cdiv(slots, block)))
    return Plan(splits, programs, sum_cd, max_cd, 2 * block * (min(kept) + D), block, warps, stages, kalign)


def check_query(query: torch.Tensor) -> None:
    B, Hq, q, D = query.shape
    if q != 1:
        raise LeanKError(f"the triton LeanK kernel decodes one token per row, got {q}: use the torch backend")
    if D not in HEAD_DIMS:
        raise LeanKError(f"the triton LeanK kernel supports head_dim {', '.join(map(str, HEAD_DIMS))}, got {D}: "
                         "use the torch backend")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LeanKError(f"the triton LeanK kernel supports fp16, bf16 and fp32, got {query.dtype}")
    if not query.is_cuda and not INTERPRET:
        raise LeanKError("the triton LeanK kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def decode_attention_triton(
    query: torch.Tensor, view: DecodeView, scaling: float, *, softcap: float | None = None,
    sinks: torch.Tensor | None = None, out: torch.Tensor | None = None, programs: int | None = None,
) -> torch.Tensor:
    """LeanK attention of one new token per row, ``query`` ``[B, H_q, 1, D]`` → ``[B, H_q, 1, D]``.

    ``softcap``/``sinks`` ``[H_q]``: the model's score terms, or None. ``out``: where to write
    (contiguous ``[B, H_q, 1, D]``); ``programs``: middle programs to spread over instead of the
    default (tests use it to force many splits)."""
    check_query(query)
    B, Hq, _, D = query.shape
    H = view.ring_k.shape[1]
    G = Hq // H
    DP = triton.next_power_of_2(D)
    query = query if query.stride(-1) == 1 else query.contiguous()
    p = plan(B, view.head_counts, D, view.slots, _sm_count(query.device), programs, quantised=bool(view.quant_bits))
    ns = p.splits
    if softcap:  # tanh(dot * scaling / cap) * cap, in base 2
        qk_scale, cap_scale = softcap * LOG2E, scaling / softcap
    else:
        qk_scale, cap_scale = scaling * LOG2E, 1.0
    if sinks is not None:
        sinks = (sinks.detach().to(torch.float32) * LOG2E).contiguous()
    ws_o = torch.empty(B * Hq * (ns + 1), DP, dtype=torch.float32, device=query.device)
    ws_l = torch.empty(B * Hq * (ns + 1), dtype=torch.float32, device=query.device)
    if out is None:
        out = torch.empty(B, Hq, 1, D, dtype=query.dtype, device=query.device)
    sk, sv, rk, rv = view.sink_k, view.sink_v, view.ring_k, view.ring_v
    _leank_decode_kernel[(B * H, ns + 1)](
        query, query.stride(0), query.stride(1),
        sk, sv, sk.stride(0), sk.stride(1), view.sink,
        rk, rv, rk.stride(0), rk.stride(1), rk.shape[2],
        view.mid_k, view.mid_v, view.mid_k.stride(0), view.mid_v.stride(0), view.slots,
        view.head_c, view.head_koff, view.head_voff, view.head_chan,
        view.pads, view.seen, view.c0, ws_o, ws_l, qk_scale, cap_scale, H, ns, B, *quant_args(view),
        SUMCD=p.sum_cd, MAXCD=p.max_cd, MIN_BUDGET=p.min_budget, PROGRAMS=p.programs,
        G=G, GP=max(16, triton.next_power_of_2(G)), D=D, DP=DP, BLOCK=p.block, KALIGN=p.kalign,
        HAS_SINK=view.sink > 0, HAS_CAP=bool(softcap), UPCAST=INTERPRET or query.dtype == torch.float32,
        PREC="ieee" if query.dtype == torch.float32 else "tf32",
        QBITS=view.quant_bits, GROUP=min(view.quant_group, DP) if view.quant_bits else 1, SYM=view.quant_symmetric,
        num_warps=p.warps, num_stages=p.stages,
    )
    _merge_kernel[(B * Hq,)](ws_o, ws_l, sinks if sinks is not None else ws_l, out, out.stride(0), out.stride(1),
                             Hq, ns + 1, D=D, DP=DP, SP=triton.next_power_of_2(ns + 1),
                             HAS_SINKS=sinks is not None, num_warps=4)
    return out
