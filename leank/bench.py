"""``leank bench``: end-to-end decoding on one GPU, dense caches against LeanK, eager and compiled.

Methods (each the path a user gets):

* ``full`` — ``DynamicCache`` + SDPA, eager: what ``generate()`` does by default;
* ``full-flash`` — ``full`` with SDPA's cuDNN backend left out (flash, memory-efficient or math):
  torch picks cuDNN on Hopper, which builds a graph for every new sequence length, and every
  decode step has one; this is the eager dense path without that cost;
* ``full-compiled`` — ``StaticCache`` + SDPA under transformers' own compile path
  (``model.get_compiled_call``: its default ``CompileConfig``, mode ``reduce-overhead``,
  i.e. CUDA graphs), as ``generate()`` runs it for a static cache;
* ``leank-eager`` — ``LeanKCache(max_length=...)``, the decode kernel, eager;
* ``leank`` — the same cache under the same compile path (what ``generate()`` does on CUDA);
* ``leank-int8`` / ``leank-int4`` / ``leank-int4s`` / ``leank-int4sr`` — ``leank`` with a quantised middle
  store (:mod:`leank.quant`; ``r``: K rotated);
* ``quantized-int4`` — transformers' ``QuantizedCache`` (quanto, needs ``optimum-quanto``),
  eager, batch 1: the dense quantised baseline of ``leank eval``'s ``quantized:int4`` (its byte
  floor counts the bytes it holds, not the dense copy it dequantises to at every step);
* any compiled method with ``-fused`` (``leank-fused``, ``full-compiled-fused``, …) — the same with
  the model's q/k/v and gate/up projections fused into one GEMM each (:mod:`leank.fuse`, what
  ``leank.fuse_projections(model)`` gives a user); the model is fused and unfused between rows, so
  both forms run side by side in one process.

For each method, prompt length ``T`` and batch ``B``: one row's prompt is prefilled eagerly
(TTFT: the forward over the prompt plus, for LeanK, storing it), the cache is repeated to
``B`` rows (the cache then holds ``B`` rows and attention reads them all; prefilling ``B``
long prompts would need far more activation memory than decoding them), then ``warmup``
steps (they compile) and ``steps`` timed steps, greedy, each timed with CUDA events.

Reported per point: TTFT, median and mean step time, tokens/s (``B`` / median step), peak
GPU memory during decode, KV bytes allocated (and LeanK's ideal), **the bytes one step
must read** (the weights it reads plus the KV it needs: the dense K/V of every token, or
LeanK's ideal bytes), that over the copy bandwidth measured in the same run (the method's
**byte floor**), and the floor over the step time (**MBU**, model-bandwidth utilisation).
``--budget-gib`` also finds the largest batch within a memory budget (predicted from the
measured per-row memory, then run under ``torch.cuda.set_per_process_memory_fraction``).
A table, then one JSON line last.

Under ``torchrun`` (or with ``--tensor-parallel`` alone, the one-device reference) the model is
loaded with ``tp_plan="auto"`` and :mod:`leank.bench_tp` measures ``full`` and ``leank-eager``
per rank: KV bytes each rank holds and their sum, step time, tokens/s, greedy tokens against
``--reference``.

    leank bench --model smollm2-135m --lengths 8192 --batches 1 64
    python benchmarks/decode_e2e.py --model llama3.1-8b-shape --lengths 32768 --batches 1 8
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch

from .attention import enable
from .bench_tp import SCRATCH, SCRATCH_HELP, TP_METHODS, argv_from_bench
from .bench_tp import main as tensor_parallel_main
from .cache import cache_kwargs, dense_cache_nbytes
from .errors import LeanKError
from .eval.methods import check_quantized_cache, quantized_cache_nbytes
from .fuse import fuse_projections, unfuse_projections
from .masks import ChannelMask
from .measure import make_cache, repeat_rows, sdpa_backends, step_timer
from .parallel import launched_world

METHODS = ("full", "full-compiled", "leank-eager", "leank", "leank-int8", "leank-int4", "leank-int4s",
           "quantized-int4", "full-flash", "leank-int4sr")  # quantized-int4: QuantizedCache (quanto), eager, batch 1
DEFAULT_METHODS = METHODS[:4]
COMPILED = ("full-compiled", "leank", "leank-int8", "leank-int4", "leank-int4s", "leank-int4sr")  # leank-<format>
FUSED = "-fused"  # suffix of a compiled method: the model's projections fused (leank.fuse)
METHODS += tuple(m + FUSED for m in COMPILED)
COMPILED += tuple(m + FUSED for m in COMPILED)
DENSE = ("full", "full-compiled", "full-flash")
COMPILE_MODES = ("reduce-overhead", "max-autotune")  # both capture CUDA graphs
LLAMA_8B_SHAPE = "llama3.1-8b-shape"


def random_llama_8b(device, dtype=torch.bfloat16):
    """A model of Llama-3.1-8B's shape with random weights (speed and memory only)."""
    from .models import shape_model

    model = shape_model(LLAMA_8B_SHAPE, device=device, dtype=dtype)
    enable(model)
    return model.eval()


# ---- what a step must read ----------------------------------------------------------------
def copy_bandwidth(device, nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of ``repeats``."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times[2:])


def weight_bytes(model, batch: int) -> int:
    """Bytes of weights one decode step reads: every parameter, except that only ``batch``
    rows of an input embedding table are read (unless it is also the output projection)."""
    embed = model.get_input_embeddings().weight
    tied = embed is model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not tied:
        total -= embed.numel() * embed.element_size() - batch * embed.shape[1] * embed.element_size()
    return total


def kv_bytes_needed(method: str, model, cache, batch: int, tokens: int) -> int:
    """KV bytes one step must read: every token's K/V for the dense caches (a sliding-window
    layer's window only), LeanK's ideal bytes (its sliding layers as the dense cache's), the bytes
    a QuantizedCache holds (codes, scales, shifts, residual — what an ideal kernel would read;
    transformers' own step also writes and reads a dense copy, so its MBU reads low)."""
    from .architectures import kv_heads_and_dim, layer_windows

    if method.startswith("leank"):
        return cache.ideal_nbytes()
    if method == "quantized-int4":
        return quantized_cache_nbytes(cache)[0]
    kv_heads, head_dim = kv_heads_and_dim(model.config)
    elem = next(model.parameters()).element_size()
    layer_tokens = sum(tokens if w is None else min(tokens, w) for w in layer_windows(model.config))
    return 2 * batch * layer_tokens * kv_heads * head_dim * elem


def kv_bytes_allocated(method: str, cache) -> tuple[int, int]:
    """(allocated, ideal) KV bytes."""
    if method.startswith("leank"):
        return cache.nbytes(), cache.ideal_nbytes()
    if method == "quantized-int4":
        held = quantized_cache_nbytes(cache)[0]
        return held, held
    if method == "full-compiled":
        allocated = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
        return allocated, allocated
    dense = dense_cache_nbytes(cache)
    return dense, dense


# ---- one measurement ------------------------------------------------------------------------
def decode_forward(model, method: str, compile_config=None):
    """The forward a decode step runs: transformers' compiled call (as ``generate()`` uses it
    for a compileable cache), or the eager one."""
    if method in COMPILED:
        torch._dynamo.reset()  # a fresh graph per point: no recompile-limit surprises across points
        return model.get_compiled_call(compile_config)
    return model.__call__


def run_one(model, method: str, mask, **kw) -> dict:
    """One (method, batch, prompt length) measurement; see the module docstring."""
    base = method.removesuffix(FUSED)
    (fuse_projections if base != method else unfuse_projections)(model)
    with sdpa_backends(base):
        return dict(_run_one(model, base, mask, **kw), method=method)


@torch.inference_mode()
def _run_one(model, method: str, mask, *, batch: int, length: int, steps: int, warmup: int, seed: int = 0,
             copy_bw: float | None = None, compile_config=None) -> dict:
    if method == "quantized-int4" and batch > 1:  # before any work: the prefill would be wasted
        raise LeanKError("quantized-int4 runs at batch 1 only (QuantizedCache's packed codes cannot be repeated "
                         "to more rows)")
    device = model.device
    enable(model)  # dense caches' plain K/V take the model's own attention (SDPA, or eager where it caps/sinks)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(10, model.config.vocab_size - 10, (1, length), generator=gen).to(device)
    total = length + warmup + steps
    cache = make_cache(method, model, mask, total + 1)
    cache_arg = cache_kwargs(cache)
    record, elapsed, sync = step_timer(device)
    sync()
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_arg)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    ttft = time.perf_counter() - start
    del out
    if batch > 1:
        repeat_rows(cache, batch)
        token = token.repeat_interleave(batch, dim=0)
    forward = decode_forward(model, method, compile_config)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    marks = []
    warm_start = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            warmup_s = time.perf_counter() - warm_start
            marks.append(record())
        if method in COMPILED:
            torch.compiler.cudagraph_mark_step_begin()
        logits = forward(input_ids=token, use_cache=True, logits_to_keep=1, **cache_arg).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        if i >= warmup:
            marks.append(record())
    sync()
    step_ms = [elapsed(marks[i], marks[i + 1]) for i in range(steps)]
    median = statistics.median(step_ms)
    allocated, ideal = kv_bytes_allocated(method, cache)
    read = weight_bytes(model, batch) + kv_bytes_needed(method, model, cache, batch, total)
    row = {
        "method": method, "batch": batch, "prompt": length, "steps": steps, "warmup_s": warmup_s,
        "ttft_s": ttft, "step_ms_median": median, "step_ms_mean": statistics.fmean(step_ms),
        "step_ms_min": min(step_ms), "step_ms_max": max(step_ms), "tokens_per_s": batch / median * 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "kv_gib": allocated / 2**30, "kv_ideal_gib": ideal / 2**30, "step_read_gb": read / 1e9,
    }
    if copy_bw:
        row["floor_ms"] = read / copy_bw * 1e3
        row["mbu"] = row["floor_ms"] / median
    return row


# ---- capacity -------------------------------------------------------------------------------
def _guarded(fn, budget_bytes: int | None):
    """``fn()`` with the allocator capped at ``budget_bytes``; ``None`` if it runs out of memory."""
    total = torch.cuda.get_device_properties(0).total_memory
    if budget_bytes:
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total))
    try:
        return fn()
    except torch.OutOfMemoryError:
        return None
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def max_batch(model, method, mask, *, length, budget_gib, steps, warmup) -> dict:
    """Largest batch whose decode fits ``budget_gib``: predicted from the peaks at batch 1
    and 2 (weights + per-row memory), then checked by running under the cap."""
    budget = int(budget_gib * 2**30)
    kw = dict(length=length, steps=steps, warmup=warmup)
    one = _guarded(lambda: run_one(model, method, mask, batch=1, **kw), budget)
    two = _guarded(lambda: run_one(model, method, mask, batch=2, **kw), budget)
    if one is None or two is None:
        return {"method": method, "prompt": length, "budget_gib": budget_gib, "max_batch": 0 if one is None else 1}
    per_row = max(two["peak_gib"] - one["peak_gib"], 1e-9)
    guess = max(1, math.floor((budget_gib - one["peak_gib"]) / per_row) + 1)
    run = None
    for batch in range(guess, max(0, guess - 4), -1):
        run = _guarded(lambda b=batch: run_one(model, method, mask, batch=b, **kw), budget)
        if run is not None:
            break
    if run is None:
        return {"method": method, "prompt": length, "budget_gib": budget_gib, "max_batch": None,
                "note": f"no batch in ({guess - 4}, {guess}] fit"}
    return {"method": method, "prompt": length, "budget_gib": budget_gib, "max_batch": run["batch"],
            "cached_tokens": run["batch"] * (length + warmup + steps), "per_row_gib": per_row,
            "predicted": guess, "run": run}


# ---- the command ------------------------------------------------------------------------------
def load(model_name: str, mask_path: str | None, device):
    from .models import load_model
    from .resources import bundled_mask_path

    if model_name == LLAMA_8B_SHAPE:
        model = random_llama_8b(device)
        mask = ChannelMask.load(mask_path or bundled_mask_path(LLAMA_8B_SHAPE))  # the authors' mask
    else:
        # Without --mask: the bundled mask picked by the model's name, else its config's shape.
        mask = ChannelMask.load(mask_path) if mask_path else None
        model, _ = load_model(model_name, dtype=torch.bfloat16, device=device)
        mask = mask or ChannelMask.load(bundled_mask_path(model, 0.7))
    return model, mask


def measure(model_name: str, *, mask_path=None, lengths=(8192,), batches=(1,), budget_gib=None, methods=DEFAULT_METHODS,
            steps=32, warmup=4, compile_mode=None, progress=print) -> dict:
    if not torch.cuda.is_available():
        raise LeanKError("leank bench measures GPU decoding: no CUDA device is available")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise LeanKError(f"unknown method(s) {sorted(unknown)}: choose from {', '.join(METHODS)}")
    if compile_mode not in (None, *COMPILE_MODES):
        raise LeanKError(f"unknown compile mode {compile_mode!r}: choose from {', '.join(COMPILE_MODES)}")
    if "quantized-int4" in methods:
        check_quantized_cache()  # before the model loads
    model, mask = load(model_name, mask_path, torch.device("cuda"))
    compile_config = None
    if compile_mode:
        from transformers import CompileConfig

        compile_config = CompileConfig(mode=compile_mode)
    copy_bw = copy_bandwidth(model.device)
    progress(f"  copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)")
    rows, capacity = [], []
    for length in lengths:
        both = []
        if budget_gib:
            for method in [m for m in methods if m in ("full", "leank")]:
                res = max_batch(model, method, mask, length=length, budget_gib=budget_gib, steps=steps, warmup=warmup)
                capacity.append(res)
                progress(f"  max batch {method} @ {length}: {res.get('max_batch')} (budget {budget_gib} GiB)")
                if res.get("run"):
                    rows.append(dict(res["run"], note="max batch"))
                if res.get("max_batch"):
                    both.append(res["max_batch"])
        grid = sorted(set(batches) | ({min(both)} if len(both) == 2 else set()))
        for batch in grid:
            for method in methods:
                try:
                    res = _guarded(lambda m=method, b=batch, t=length: run_one(
                        model, m, mask, batch=b, length=t, steps=steps, warmup=warmup, copy_bw=copy_bw,
                        compile_config=compile_config), None)
                    row = res or {"method": method, "batch": batch, "prompt": length, "oom": True}
                except LeanKError as e:
                    row = {"method": method, "batch": batch, "prompt": length, "error": str(e)}
                if len(both) == 2 and batch == min(both):
                    row["note"] = "largest batch both full and leank fit"
                rows.append(row)
                progress("  " + _fmt(row))
    return {"model": model_name, "mask": str(mask_path or "default"),
            "compile_mode": compile_mode or "default (reduce-overhead)", "copy_tb_s": copy_bw / 1e12, "rows": rows,
            "capacity": capacity, "summary": summarize(rows, capacity)}


def summarize(rows: list[dict], capacity: list[dict]) -> dict:
    """Per (prompt, batch): tokens/s of each method, LeanK compiled over the faster dense
    method, its step time over its byte floor; and cached tokens at the memory budget."""
    points: dict[str, dict] = {}
    for row in rows:
        if "tokens_per_s" in row and row.get("note") != "max batch":
            points.setdefault(f"{row['prompt']}x{row['batch']}", {})[row["method"]] = row
    speedup = {}
    for key, by_method in points.items():
        dense = [r["tokens_per_s"] for m, r in by_method.items() if m.removesuffix(FUSED) in DENSE]
        entry = {}
        for m in ("leank", "leank" + FUSED):
            if m in by_method and dense:
                entry[f"{m}_over_best_dense"] = by_method[m]["tokens_per_s"] / max(dense)
        for m in ("leank", "leank" + FUSED, "full-compiled", "full-compiled" + FUSED):
            if m in by_method and "floor_ms" in by_method[m]:
                entry[f"{m}_step_over_own_floor"] = by_method[m]["step_ms_median"] / by_method[m]["floor_ms"]
        if "leank" in by_method and "quantized-int4" in by_method:
            entry["leank_over_quantized_int4"] = (by_method["leank"]["tokens_per_s"]
                                                  / by_method["quantized-int4"]["tokens_per_s"])
        if "leank" in by_method and "full" in by_method and "floor_ms" in by_method["full"]:
            entry["leank_step_over_dense_floor"] = by_method["leank"]["step_ms_median"] / by_method["full"]["floor_ms"]
        speedup[key] = entry
    tokens = {}
    for cap in capacity:
        if cap.get("cached_tokens"):
            tokens.setdefault(cap["prompt"], {})[cap["method"]] = cap["cached_tokens"]
    for by_method in tokens.values():
        if "full" in by_method and "leank" in by_method:
            by_method["leank_over_full"] = by_method["leank"] / by_method["full"]
    tps = {key: {m: r["tokens_per_s"] for m, r in by_method.items()} for key, by_method in points.items()}
    return {"tokens_per_s": tps, "ratios": speedup, "cached_tokens_at_budget": tokens}


def _fmt(row: dict) -> str:
    head = f"{row['method']:>14} B={row['batch']} T={row['prompt']}"
    if row.get("error"):
        return f"{head}: {row['error']}"
    if row.get("oom"):
        return f"{head}: out of memory"
    floor = f", floor {row['floor_ms']:.2f} ms, MBU {row['mbu']:.0%}" if "floor_ms" in row else ""
    peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB"  # None: not on a GPU
    return (f"{head}: TTFT {row['ttft_s']:.3f} s, step {row['step_ms_median']:.2f} ms{floor}, "
            f"{row['tokens_per_s']:.1f} tok/s, peak {peak}, KV {row['kv_gib']:.3f} GiB "
            f"(ideal {row['kv_ideal_gib']:.3f}), warm-up {row['warmup_s']:.1f} s")


def markdown(result: dict, environment: dict) -> str:
    lines = [
        f"# End-to-end decoding: {result['model']}",
        "",
        f"GPU: {environment.get('gpu')}; torch {environment.get('torch')}, transformers "
        f"{environment.get('transformers')}, triton {environment.get('triton')}; copy bandwidth "
        f"{result['copy_tb_s']:.2f} TB/s (read + write, measured in this run).",
        f"Command: `{environment.get('command')}`; compile mode of the compiled methods: "
        f"{result.get('compile_mode', 'default')}.",
        "",
        "Step = median of the timed steps (CUDA events). Read = weights read + KV bytes needed per step; "
        "floor = read / copy bandwidth; MBU = floor / step.",
        "",
        "| method | batch | prompt | TTFT s | step ms | tokens/s | read GB | floor ms | MBU | peak GiB | "
        "KV GiB (ideal) | warm-up s | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("oom") or r.get("error"):
            why = "out of memory" if r.get("oom") else r["error"]
            lines.append(f"| {r['method']} | {r['batch']} | {r['prompt']} | {why} |" + " |" * 9)
            continue
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['prompt']} | {r['ttft_s']:.3f} | {r['step_ms_median']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {r['step_read_gb']:.2f} | {r.get('floor_ms', float('nan')):.2f} | "
            f"{r.get('mbu', float('nan')):.0%} | {r['peak_gib']:.2f} | {r['kv_gib']:.3f} ({r['kv_ideal_gib']:.3f}) | "
            f"{r['warmup_s']:.1f} | {r.get('note', '')} |"
        )
    if result["capacity"]:
        lines += ["", "| method | prompt | budget GiB | max batch | cached tokens | GiB per row |",
                  "|---|---|---|---|---|---|"]
        for c in result["capacity"]:
            lines.append(f"| {c['method']} | {c['prompt']} | {c['budget_gib']} | {c.get('max_batch')} | "
                         f"{c.get('cached_tokens', '')} | {c.get('per_row_gib', float('nan')):.3f} |")
    lines += ["", "Summary: `" + json.dumps(result["summary"]["ratios"]) + "`", ""]
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("bench", help="end-to-end decoding on a GPU: dense caches vs LeanK, eager and compiled")
    p.add_argument("--model", default="smollm2-135m", help=f"a model name or {LLAMA_8B_SHAPE} (random weights)")
    p.add_argument("--mask", default=None, help="mask file (default: bundled / the authors' Llama mask)")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--budget-gib", type=float, default=None, help="find the largest batch within this memory")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"any of {', '.join(METHODS)} (default: the first four; under tensor parallelism "
                        f"{' and '.join(TP_METHODS)})")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first (compiled methods compile in them)")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode of the compiled methods (default: transformers' CompileConfig, "
                        "reduce-overhead)")
    p.add_argument("--out", default=None, help="directory for results.json and results.md")
    tp = p.add_argument_group("tensor parallelism (transformers tp_plan='auto'; on by itself under torchrun with 2+ "
                              "processes; --model: a random-weight shape or a local model directory)")
    tp.add_argument("--tensor-parallel", action="store_true",
                    help="measure as one rank of a tensor-parallel group: methods full and leank-eager (eager: the "
                         "compiled path is one process only); per-rank and summed KV bytes, greedy tokens in "
                         "tokens.json. Alone (world size 1) this is the reference run for --reference")
    tp.add_argument("--reference", default=None, help="tokens.json of a --tensor-parallel run on one device: "
                                                      "report whether the greedy tokens are the same")
    tp.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) or float32 (default on the CPU)")
    tp.add_argument("--scratch", default=None, help=f"{SCRATCH_HELP} (default {SCRATCH})")
    p.set_defaults(run=_main)


def _main(args) -> int:
    import shlex

    from ._env import environment
    from ._io import atomic_write_json, atomic_write_text

    for name, values in (("lengths", args.lengths), ("batches", args.batches)):
        if any(v < 1 for v in values):
            raise LeanKError(f"--{name} must be positive integers, got {values}")
    if args.steps < 1 or args.warmup < 0:
        raise LeanKError("--steps must be >= 1 and --warmup >= 0")
    world = launched_world()
    if args.tensor_parallel or world > 1:
        launcher = f"torchrun --nproc_per_node {world} -m leank.cli" if world > 1 else "leank"
        tensor_parallel_main(argv_from_bench(args), prog="leank bench --tensor-parallel",
                             command=shlex.join([*launcher.split(), *args.argv]))
        return 0
    if args.reference or args.dtype or args.scratch:
        raise LeanKError("--reference, --dtype and --scratch belong to --tensor-parallel runs (leank bench is bf16 "
                         "on one GPU)")
    args.methods = args.methods or list(DEFAULT_METHODS)
    if any(m in COMPILED for m in args.methods) and args.warmup < 3:
        raise LeanKError("compiled methods need --warmup >= 3 (compilation and CUDA-graph recording happen there)")
    result = measure(args.model, mask_path=args.mask, lengths=args.lengths, batches=args.batches,
                   budget_gib=args.budget_gib, methods=args.methods, steps=args.steps, warmup=args.warmup,
                   compile_mode=args.compile_mode)
    env = environment(shlex.join(["leank", *args.argv]))
    text = markdown(result, env)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "results.json", {"environment": env, **result})
        atomic_write_text(out / "results.md", text)
    print(json.dumps({"model": result["model"], "copy_tb_s": result["copy_tb_s"], **result["summary"]}))
    return 0
