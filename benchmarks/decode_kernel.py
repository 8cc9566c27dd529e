"""Decode-attention kernel benchmark: LeanK (Triton) vs dense SDPA (cuDNN, Flash) on one GPU.

For each model shape and batch x tokens, every layer's LeanK store is built from the
same random bf16 K/V with that layer's mask (one layer in memory at a time), and one
decode step's attention is timed per layer (GPU time from CUDA-graph replays, L2 flushed
before each call, median of 7; see ``bench``). The LeanK figure is the sum over layers; dense attention
costs the same in every layer, so its figure is the per-layer median times the layer
count. Bytes are what each method must read (K and V; LeanK: sink + window tokens in
full, middle tokens with kept K channels and V of non-empty heads); TB/s = bytes / time.
Copy bandwidth (``dst.copy_(src)``, read + write bytes) is measured in the same run.

    python benchmarks/decode_kernel.py --out benchmarks/results/decode_kernel_h100
    python benchmarks/decode_kernel.py --models gemma2-9b-global phi3-mini --out benchmarks/results/decode_kernel_arch

Shapes of other architectures use random K/V and a mask with the authors' Llama-3.1-8B
head-count distribution (:func:`leank.masks.authors_like_mask`: 0, 1/4, 1/2, 3/4 of the
channels kept): ``gemma2-9b-global`` is Gemma 2 9B's 21 global layers (its 21 sliding-window
layers are never compressed; 16 query / 8 KV heads, head_dim 256, scaling 1/16, soft-capping
at 50: LeanK applies it, while torch's SDPA backends cannot, so their figure is a lower
bound of a dense decode that caps), at 8 × 8K (its context); ``phi3-mini`` is Phi-3-mini-128k's
32 layers (32 query and 32 KV heads, head_dim 96: the kernel pads it to 128 lanes; the 4k
variant's 2047-token window makes every layer sliding, which LeanK refuses).

``--quant int8 int4`` adds the kernel over a quantised middle store (:class:`leank.KVQuant`,
groups of 32; dequantised in the kernel's loads) for the same layers, as ``leank-int8`` /
``leank-int4`` columns; its bytes are codes + scales (+ zero points unless symmetric) (plus sink and window in
bf16), its speed-up is over the faster dense backend too:

    python benchmarks/decode_kernel.py --models llama3.1-8b --shapes 8x32768 1x131072 --quant int8 int4 \
        --out benchmarks/results/decode_kernel_quant_h200

``--sweep`` first times a few kernel configurations (block, warps, stages, waves)
on a subset of layers per shape and reports them; the main table uses the library's
default configuration unless ``--use-best`` is given.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402

from leank._io import atomic_write_json, atomic_write_text  # noqa: E402
from leank.cache import LeanKLayer  # noqa: E402
from leank.masks import ChannelMask, authors_like_mask  # noqa: E402
from leank.quant import parse_quant  # noqa: E402
from leank.resources import bundled_mask_path  # noqa: E402

HERE = Path(__file__).resolve().parent
AUTHORS_LIKE = "authors-like"  # a random mask with the authors' Llama head-count distribution
SHAPES = [(1, 32768), (1, 131072), (8, 32768), (64, 32768)]
MODELS = {
    # name: (query heads, KV heads, head_dim, mask: file or (AUTHORS_LIKE, layers), scaling, softcap, shapes)
    "llama3.1-8b": (32, 8, 128, bundled_mask_path("llama-3.1-8b-instruct"), None, None, SHAPES),
    "smollm2-135m": (9, 3, 64, None, None, None, SHAPES),
    "gemma2-9b-global": (16, 8, 256, (AUTHORS_LIKE, 21), 256 ** -0.5, 50.0, [(8, 8192)]),
    "phi3-mini": (32, 32, 96, (AUTHORS_LIKE, 32), None, None, [(8, 32768)]),
}


def model_mask(name: str) -> ChannelMask:
    """The benchmark's mask for a model shape (see the module docstring)."""
    _, H, D, source, *_ = MODELS[name]
    if isinstance(source, tuple):
        scores = torch.rand(source[1], H, D, generator=torch.Generator().manual_seed(0))
        return authors_like_mask(scores)
    return ChannelMask.load(source or bundled_mask_path("smollm2-135m", 0.7))
SWEEP = [(block, 4, stages, waves) for block in (32, 64, 128) for stages in (2, 3) for waves in (2, 4, 8)]


def bench(fn, reps: int = 20, trials: int = 7) -> float:
    """Median GPU milliseconds of one ``fn()`` call, L2 flushed before each call.

    ``reps`` × (flush, fn) are captured in one CUDA graph, and ``reps`` flushes alone in
    another; a call's time is the difference over ``reps`` (median of ``trials``). Graphs
    remove host launch overhead, so this is the GPU time a captured decode step would see.
    """
    flush = torch.empty(96 << 20, dtype=torch.uint8, device="cuda")  # > the H100's 50 MB L2
    fn()
    torch.cuda.synchronize()
    graphs = []
    for with_fn in (True, False):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()
        graphs.append(graph)
    times = []
    for _ in range(trials):
        pair = []
        for graph in graphs:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            pair.append(start.elapsed_time(end))
        times.append((pair[0] - pair[1]) / reps)
    return sorted(times)[len(times) // 2]


def build_layer(kept, k, v, sink, recent, quant=None) -> LeanKLayer:
    """A LeanK layer holding the prompt ``k``/``v`` compressed (``quant``: quantised), plus one decoded token."""
    layer = LeanKLayer(kept.to(k.device), sink=sink, recent=recent, max_length=k.shape[2] + 1, quant=quant)
    layer.update(k, v)
    layer.after_prefill(None, torch.zeros(k.shape[0], dtype=torch.long, device=k.device))
    layer.update(k[:, :, -1:].clone(), v[:, :, -1:].clone())
    return layer


def leank_read_bytes(layer: LeanKLayer) -> int:
    """K/V bytes one decode step must read from this layer's LeanK store (batch rows, no padding;
    a quantised middle token: its codes, scales and zero points)."""
    seen, ring = int(layer.seen), layer.ring_k.shape[2]
    full_tokens = min(layer.sink, max(0, seen - ring)) + min(seen, ring)
    full_token, middle_token = layer._token_bytes()
    return layer.batch * (full_tokens * full_token + layer.middle_length() * middle_token)


def dense_fns(q, k, v, scaling):
    """SDPA decode with GQA, per backend: the query heads of a KV head as that head's queries."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, Hq, _, D = q.shape
    H = k.shape[1]
    q_packed = q.view(B, H, Hq // H, D)  # [B, H, G, D]: G queries per KV head, no causal mask
    fns = {}
    for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        def fn(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q_packed, k, v, scale=scaling)
        try:
            fn()
            fns[name] = fn
        except RuntimeError as err:  # a backend that does not support the shape
            print(f"  {name}: unavailable ({str(err).splitlines()[0][:100]})")
    return fns


def copy_bandwidth(device) -> float:
    """``dst.copy_(src)`` of 1 GiB, read + write bytes, timed eagerly (``triton.testing.do_bench``):
    inside a CUDA graph the copy becomes a memcpy node that runs slower (2.44 TB/s measured)."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() / ms / 1e9  # TB/s


def run_leank(layers, q, scaling, config=None, softcap=None):
    """Sum over ``layers`` of one decode call's GPU time (``config``: block, warps, stages, waves)."""
    from leank.kernels import triton_decode as td

    if config:
        os.environ["LEANK_TRITON_CONFIG"] = ",".join(map(str, config))
    else:
        os.environ.pop("LEANK_TRITON_CONFIG", None)
    return sum(bench(lambda layer=layer: td.decode_attention_triton(q, layer.view, scaling, softcap=softcap))
               for layer in layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="batch x tokens, e.g. 8x32768 (default: each model's shapes)")
    parser.add_argument("--sweep", action="store_true",
                        help="time kernel configurations on a layer subset first (Llama shape only)")
    parser.add_argument("--use-best", action="store_true", help="main table with the sweep's best configuration")
    parser.add_argument("--quant", nargs="*", default=[], metavar="FORMAT",
                        help="also time the kernel over a quantised middle store: int8, int4, int4g64 ...")
    parser.add_argument("--out", default="benchmarks/results/decode_kernel")
    args = parser.parse_args()
    quants = [parse_quant(text) for text in args.quant]
    if not torch.cuda.is_available():
        sys.exit("decode_kernel.py needs a CUDA GPU")
    device = torch.device("cuda")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_tbs = copy_bandwidth(device)
    print(f"copy bandwidth: {copy_tbs:.3f} TB/s (read + write)")
    free = torch.cuda.mem_get_info()[0]

    rows, sweeps = [], []
    for model in args.models:
        Hq, H, D, _, model_scaling, softcap, model_shapes = MODELS[model]
        mask = model_mask(model)
        for shape in args.shapes or [f"{b}x{t}" for b, t in model_shapes]:
            B, T = (int(x) for x in shape.split("x"))
            dense_bytes = 2 * B * H * T * D * 2
            if 2.2 * dense_bytes > free * 0.9:
                print(f"{model} {shape}: skipped (needs ~{2.2 * dense_bytes / 2**30:.0f} GiB)")
                rows.append({"model": model, "batch": B, "tokens": T, "skipped": "does not fit"})
                continue
            torch.manual_seed(0)
            k = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16)
            v = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16)
            q = torch.randn(B, Hq, 1, D, device=device, dtype=torch.bfloat16)
            scaling = model_scaling or 1 / math.sqrt(D)
            row = {"model": model, "batch": B, "tokens": T, "layers": mask.num_layers,
                   "dense_bytes_per_layer": dense_bytes, "softcap": softcap, "mask": mask.method}
            for name, fn in dense_fns(q, k, v, scaling).items():
                ms = bench(fn)
                row[f"{name}_ms"] = ms * mask.num_layers
                row[f"{name}_tbs"] = dense_bytes / ms / 1e9
            del k, v
            # LeanK: one layer at a time (built from fresh K/V so memory stays bounded).
            k = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16)
            v = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16)
            layer_ids = range(mask.num_layers)
            subset = layer_ids[:: max(1, mask.num_layers // 4)]
            if args.sweep and model == "llama3.1-8b":
                layers = [build_layer(mask.kept[i], k, v, mask.sink, mask.recent) for i in subset]
                best = None
                for config in SWEEP:
                    try:
                        ms = run_leank(layers, q, scaling, config)
                    except Exception as err:  # noqa: BLE001 - e.g. out of shared memory
                        print(f"  config {config}: failed ({type(err).__name__})")
                        continue
                    sweeps.append({"model": model, "batch": B, "tokens": T, "layers": list(subset),
                                   "block": config[0], "warps": config[1], "stages": config[2],
                                   "waves": config[3], "ms": ms})
                    if best is None or ms < best[0]:
                        best = (ms, config)
                default_ms = run_leank(layers, q, scaling)
                print(f"  sweep {model} {shape}: default {default_ms:.4f} ms, best {best[0]:.4f} ms "
                      f"with block/warps/stages/waves {best[1]}")
                row["sweep_default_ms"], row["sweep_best_ms"] = default_ms, best[0]
                row["sweep_best"] = dict(zip(("block", "warps", "stages", "waves"), best[1], strict=True))
                del layers
            swept = args.sweep and model == "llama3.1-8b"
            config = best[1] if swept and args.use_best else None
            total_ms, total_bytes = 0.0, 0
            for i in layer_ids:
                layer = build_layer(mask.kept[i], k, v, mask.sink, mask.recent)
                total_ms += run_leank([layer], q, scaling, config, softcap)
                total_bytes += leank_read_bytes(layer)
                del layer
            del k, v
            torch.cuda.empty_cache()
            dense_best = min(row.get("sdpa-cudnn_ms", math.inf), row.get("sdpa-flash_ms", math.inf))
            if quants:
                k = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16)
                v = torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16)
            for quant in quants:
                q_ms, q_bytes = 0.0, 0
                for i in layer_ids:
                    layer = build_layer(mask.kept[i], k, v, mask.sink, mask.recent, quant)
                    q_ms += run_leank([layer], q, scaling, config, softcap)
                    q_bytes += leank_read_bytes(layer)
                    del layer
                name = f"leank-{quant.label}"
                row.update({f"{name}_ms": q_ms, f"{name}_bytes": q_bytes,
                            f"{name}_bytes_fraction": q_bytes / (dense_bytes * mask.num_layers),
                            f"{name}_tbs": q_bytes / q_ms / 1e9, f"{name}_speedup_vs_best_dense": dense_best / q_ms,
                            f"{name}_tbs_over_copy": q_bytes / q_ms / 1e9 / copy_tbs})
            if quants:
                del k, v
                torch.cuda.empty_cache()
            row.update({
                "leank_ms": total_ms, "leank_bytes": total_bytes,
                "leank_bytes_fraction": total_bytes / (dense_bytes * mask.num_layers),
                "leank_tbs": total_bytes / total_ms / 1e9,
                "leank_config": "default" if config is None else {"block_warps_stages_waves": config},
                "speedup_vs_best_dense": dense_best / total_ms,
                "leank_tbs_over_copy": total_bytes / total_ms / 1e9 / copy_tbs,
            })
            rows.append(row)
            print(f"{model} {B}x{T}: " + ", ".join(
                f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}" for k_, v_ in row.items()
                if k_ not in ("model", "batch", "tokens", "sweep_best")))

    table = markdown(rows, copy_tbs)
    print(table)
    result = {"environment": environment(), "copy_tbs": copy_tbs, "rows": rows, "sweep": sweeps}
    atomic_write_json(out_dir / "results.json", result)
    atomic_write_text(out_dir / "table.md", table)
    fields = sorted({key for row in rows for key in row if not isinstance(row[key], dict)})
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: list[dict], copy_tbs: float) -> str:
    lines = [
        f"Decode attention, all layers, one token per row (bf16; copy bandwidth {copy_tbs:.2f} TB/s).",
        "",
        "| model | batch × tokens | cuDNN ms (TB/s) | Flash ms (TB/s) | LeanK ms (TB/s) | LeanK bytes | "
        "speed-up | LeanK TB/s / copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['batch']} × {r['tokens']} | {r['skipped']} | | | | | |")
            continue

        def cell(name, r=r):
            return f"{r[name + '_ms']:.3f} ({r[name + '_tbs']:.2f})" if name + "_ms" in r else "n/a"

        lines.append(
            f"| {r['model']} | {r['batch']} × {r['tokens']} | {cell('sdpa-cudnn')} | {cell('sdpa-flash')} | "
            f"{cell('leank')} | {r['leank_bytes_fraction']:.3f} | {r['speedup_vs_best_dense']:.2f}× | "
            f"{r['leank_tbs_over_copy']:.0%} |"
        )
    quant_names = sorted({key[: -len("_bytes_fraction")] for r in rows for key in r
                          if key.startswith("leank-") and key.endswith("_bytes_fraction")})
    if quant_names:
        lines += ["", "Quantised middle store (codes + scales + zero points unless symmetric; bytes vs the dense "
                  "bf16 K/V):", "",
                  "| model | batch × tokens | method | ms (TB/s) | bytes | speed-up vs best dense | TB/s / copy |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            for name in quant_names:
                if f"{name}_ms" in r:
                    lines.append(f"| {r['model']} | {r['batch']} × {r['tokens']} | {name} | {r[name + '_ms']:.3f} "
                                 f"({r[name + '_tbs']:.2f}) | {r[name + '_bytes_fraction']:.3f} | "
                                 f"{r[name + '_speedup_vs_best_dense']:.2f}× | {r[name + '_tbs_over_copy']:.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
