# ruff: noqa  (frozen: the script as it ran)
"""Scratch: can a Triton GEMV beat cuBLAS's for the small projections of a decode step (issue 12)?

Per shape, 32 distinct weights (no L2 reuse), each variant's 32 products captured in one CUDA graph,
median of replays; GB/s over the weight bytes, as a fraction of a copy measured in the same run.
Writes $OUT/gemv.json (or ./gemv.json).
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _gemv_dot(X, W, Y, M, N, K, sxm, swn, sym, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        x = tl.load(X + rm[:, None] * sxm + (k + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        w = tl.load(W + rn[:, None] * swn + (k + rk)[None, :], mask=rn[:, None] < N, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(Y + rm[:, None] * sym + rn[None, :], acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _gemv_red(X, W, Y, M, N, K, sxm, swn, sym, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """M == 1 only: a row-dot reduction on CUDA cores."""
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BN, BK), tl.float32)
    for k in range(0, K, BK):
        x = tl.load(X + k + rk).to(tl.float32)
        w = tl.load(W + rn[:, None] * swn + (k + rk)[None, :], mask=rn[:, None] < N, other=0.0).to(tl.float32)
        acc += w * x[None, :]
    tl.store(Y + rn, tl.sum(acc, 1).to(Y.dtype.element_ty), mask=rn < N)


def gemv(x, w, kernel, BN, BK, warps, stages, out=None):
    M, K = x.shape
    N = w.shape[0]
    y = out if out is not None else torch.empty(M, N, device=x.device, dtype=x.dtype)
    BM = 16 if kernel is _gemv_dot else 1
    kernel[(triton.cdiv(N, BN),)](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), BM=BM, BN=BN, BK=BK,
                                   num_warps=warps, num_stages=stages)
    return y


def timed(fn, repeats=30):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(repeats):
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    big = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
    copy_ms = timed(lambda: big[1 << 30:].copy_(big[: 1 << 30]), 10)
    copy_bw = 2 * (1 << 30) / copy_ms / 1e6  # GB/s
    del big
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    if len(sys.argv) > 1:
        shapes = {k: v for k, v in shapes.items() if k in sys.argv[1:]}
    variants = {"cublas": None}
    for BN in (16, 32, 64):
        for BK in (128, 256):
            for warps in (4,):
                for stages in (3, 4):
                    variants[f"dot_n{BN}_k{BK}_w{warps}_s{stages}"] = (_gemv_dot, BN, BK, warps, stages)
    for BN in (4, 8, 16):
        for BK in (512, 1024):
            for warps in (4, 8):
                variants[f"red_n{BN}_k{BK}_w{warps}"] = (_gemv_red, BN, BK, warps, 1)
    rows = []
    for name, (N, K) in shapes.items():
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(32)]
        for M in (1, 8):
            xs = [torch.randn(M, K, device=dev, dtype=torch.bfloat16) for _ in range(32)]
            ref = [F.linear(x, w) for x, w in zip(xs, ws)]
            outs = [torch.empty_like(r) for r in ref]
            for vname, v in variants.items():
                if v is not None and v[0] is _gemv_red and M != 1:
                    continue
                try:
                    if v is None:
                        def fn():
                            for x, w, o in zip(xs, ws, outs):
                                torch.mm(x, w.t(), out=o)
                    else:
                        def fn(v=v):
                            for x, w, o in zip(xs, ws, outs):
                                gemv(x, w, *v[:1], *v[1:], out=o)
                    fn()
                    torch.cuda.synchronize()
                    err = max((o.float() - r.float()).abs().max().item() for o, r in zip(outs, ref))
                    ms = timed(fn)
                except Exception as e:  # noqa: BLE001
                    rows.append({"shape": name, "M": M, "variant": vname, "error": repr(e)[:200]})
                    continue
                gbs = 32 * N * K * 2 / ms / 1e6
                rows.append({"shape": name, "M": M, "variant": vname, "us_per_gemv": ms * 1000 / 32,
                             "frac_copy": gbs / copy_bw, "max_err": err})
            best = sorted([r for r in rows if r["shape"] == name and r["M"] == M and "frac_copy" in r],
                          key=lambda r: -r["frac_copy"])[:4]
            cub = [r for r in rows if r["shape"] == name and r["M"] == M and r["variant"] == "cublas"]
            print(name, M, "cublas", cub and round(cub[0]["frac_copy"], 3), cub and round(cub[0]["us_per_gemv"], 2),
                  "| best", [(r["variant"], round(r["frac_copy"], 3), round(r["us_per_gemv"], 2)) for r in best],
                  flush=True)
        del ws
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "gemv.json"), "w") as f:
        json.dump({"copy_GBs": copy_bw, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
