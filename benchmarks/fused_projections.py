"""How much of a decode step's weight reads fusing the projections would save (issue 12 lead).

The 8B-shape profiles put the model's own GEMMs at ~85% of copy bandwidth, the k/v projections at
~38% (small GEMVs that cuBLAS runs with a split-K reduction). This times, for every layer of the
Llama-3.1-8B shape with its own random bf16 weights (no L2 reuse), the seven projections as
transformers runs them (q, k, v, o, gate, up, down) against four fused ones (qkv, o, gate|up,
down), each sequence captured in one CUDA graph so launch costs are those of a compiled step.
Prints a table and one JSON line; ``--out DIR`` writes ``fused_projections.json``.

    python benchmarks/fused_projections.py --batches 1 8
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from leank.bench import copy_bandwidth

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 4096, 32, 8, 128, 14336, 32


def _layer_weights(device, fused: bool):
    def w(rows, cols):
        return torch.randn(rows, cols, device=device, dtype=torch.bfloat16) * 0.02

    q, kv, o = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, HIDDEN
    if fused:
        return [w(q + 2 * kv, HIDDEN), w(o, q), w(2 * FFN, HIDDEN), w(HIDDEN, FFN)]
    return [w(q, HIDDEN), w(kv, HIDDEN), w(kv, HIDDEN), w(o, q), w(FFN, HIDDEN), w(FFN, HIDDEN), w(HIDDEN, FFN)]


def _step(x, layers, fused: bool):
    for ws in layers:
        if fused:
            qkv, wo, gu, wd = ws
            a = F.linear(x, qkv)[:, : HEADS * HEAD_DIM]
            x = x + F.linear(a, wo)
            g, u = F.linear(x, gu).chunk(2, -1)
            x = x + F.linear(F.silu(g) * u, wd)
        else:
            wq, wk, wv, wo, wg, wu, wd = ws
            a = F.linear(x, wq)
            F.linear(x, wk), F.linear(x, wv)
            x = x + F.linear(a, wo)
            x = x + F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    return x


def time_graph(batch: int, fused: bool, device, repeats: int) -> float:
    layers = [_layer_weights(device, fused) for _ in range(LAYERS)]
    x = torch.randn(batch, HIDDEN, device=device, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            _step(x, layers, fused)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _step(x, layers, fused)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del layers, graph
    torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--blas", choices=["cublas", "cublaslt"], default=None,
                        help="torch.backends.cuda.preferred_blas_library (default: torch's choice)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    copy = copy_bandwidth(device)
    weight_bytes = LAYERS * 2 * HIDDEN * (HEADS * HEAD_DIM * 2 + 2 * KV_HEADS * HEAD_DIM + 3 * FFN)
    rows = []
    for batch in args.batches:
        split = time_graph(batch, False, device, args.repeats)
        fused = time_graph(batch, True, device, args.repeats)
        rows.append({"batch": batch, "unfused_ms": round(split, 4), "fused_ms": round(fused, 4),
                     "saved_ms": round(split - fused, 4), "weight_gb": round(weight_bytes / 1e9, 3),
                     "unfused_of_copy": round(weight_bytes / (split * 1e-3) / copy, 3),
                     "fused_of_copy": round(weight_bytes / (fused * 1e-3) / copy, 3)})
    print("| batch | 7 GEMMs/layer ms | 4 fused ms | saved ms | of copy bw (7 → 4) |")
    print("|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['unfused_ms']:.3f} | {r['fused_ms']:.3f} | {r['saved_ms']:.3f} | "
              f"{r['unfused_of_copy']:.0%} → {r['fused_of_copy']:.0%} |")
    result = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "python": platform.python_version(), "copy_tb_s": round(copy / 1e12, 3),
              "repeats": args.repeats, "blas": str(torch.backends.cuda.preferred_blas_library()), "rows": rows}
    print(json.dumps(result))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"fused_projections{'_' + args.blas if args.blas else ''}.json"
        (args.out / name).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
