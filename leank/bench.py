"""``leank bench``: end-to-end decoding, full cache vs LeanK, on one GPU.

Methods: ``full`` (transformers' ``DynamicCache`` + SDPA, what ``generate()`` uses by
default), ``static`` (``StaticCache`` + SDPA: preallocated, no per-step copy, a stronger
dense baseline) and ``leank`` (``LeanKCache`` + the Triton decode kernel, buffers
preallocated for the requested length).

For each method, prompt length ``T`` and batch ``B``: one row's prompt is prefilled (TTFT,
the model's forward over the prompt plus, for LeanK, compressing it), the cache is
repeated to ``B`` rows (``batch_repeat_interleave``: the cache then holds ``B`` rows of
memory and attention reads all of them; prefilling ``B`` long prompts at once would need
far more activation memory than decoding them), then ``steps`` tokens are decoded
greedily after ``warmup`` steps, each step timed with CUDA events (no host sync inside
the loop). Reported: TTFT, median and mean time per output step, output tokens/s
(``B`` / median step), peak GPU memory during decode (weights included), KV-cache bytes
(measured allocation, and the ideal figure), and per method the largest batch that fits
a memory budget (predicted from the measured per-row memory, then run under
``torch.cuda.set_per_process_memory_fraction``; a batch that runs out of memory does not
fit).

    leank bench --model smollm2-135m --lengths 8192 --batches 1 8 --budget-gib 16
    python benchmarks/decode_e2e.py --model llama3.1-8b-shape --lengths 32768
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from .cache import LeanKCache, cache_kwargs, dense_cache_nbytes
from .errors import LeanKError
from .masks import ChannelMask

METHODS = ("full", "static", "leank")
LLAMA_8B_SHAPE = "llama3.1-8b-shape"
AUTHORS_LLAMA_MASK = "llama3.1-8b-instruct.leank-mask.safetensors"


def random_llama_8b(device, dtype=torch.bfloat16):
    """A model of Llama-3.1-8B's shape with random weights (speed and memory only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    config._attn_implementation = "leank"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_cache(method: str, model, mask: ChannelMask | None, max_length: int):
    from transformers import DynamicCache, StaticCache

    if method == "full":
        return DynamicCache(config=model.config)
    if method == "static":
        return StaticCache(config=model.config, max_cache_len=max_length)
    return LeanKCache(model, mask, max_length=max_length)


def cache_bytes(method: str, cache) -> tuple[int, int]:
    """(allocated, ideal) KV bytes."""
    if method == "leank":
        return cache.nbytes(), cache.ideal_nbytes()
    if method == "static":
        allocated = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
        return allocated, allocated
    dense = dense_cache_nbytes(cache)
    return dense, dense


@torch.inference_mode()
def run_one(model, method: str, mask, *, batch: int, length: int, steps: int, warmup: int, seed: int = 0) -> dict:
    """One (method, batch, prompt length) measurement; see the module docstring."""
    device = model.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(10, model.config.vocab_size - 10, (1, length), generator=gen).to(device)
    cache = make_cache(method, model, mask, length + warmup + steps + 1)
    cache_arg = cache_kwargs(cache)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_arg)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    ttft = time.perf_counter() - start
    del out
    if batch > 1:
        try:
            cache.batch_repeat_interleave(batch)
        except torch.OutOfMemoryError:
            raise
        except (NotImplementedError, AttributeError, RuntimeError) as e:
            raise LeanKError(f"{type(cache).__name__} cannot repeat its batch: {e}") from None
        token = token.repeat_interleave(batch, dim=0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    for i in range(warmup + steps):
        if i == warmup:
            events[0].record()
        logits = model(input_ids=token, use_cache=True, logits_to_keep=1, **cache_arg).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        if i >= warmup:
            events[i - warmup + 1].record()
    torch.cuda.synchronize()
    step_ms = [events[i].elapsed_time(events[i + 1]) for i in range(steps)]
    allocated, ideal = cache_bytes(method, cache)
    median = statistics.median(step_ms)
    return {
        "method": method, "batch": batch, "prompt": length, "steps": steps,
        "ttft_s": ttft, "step_ms_median": median, "step_ms_mean": statistics.fmean(step_ms),
        "tokens_per_s": batch / median * 1e3, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "kv_gib": allocated / 2**30, "kv_ideal_gib": ideal / 2**30,
    }


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


def load(model_name: str, mask_path: str | None, device):
    from .models import load_model
    from .resources import bundled_mask_path

    if model_name == LLAMA_8B_SHAPE:
        model = random_llama_8b(device)
        if mask_path is None:  # the authors' mask, kept with the benchmarks in a source checkout
            mask_path = Path(__file__).resolve().parent.parent / "benchmarks/masks" / AUTHORS_LLAMA_MASK
            if not mask_path.is_file():
                raise LeanKError(f"{LLAMA_8B_SHAPE} needs --mask (the authors' mask, {AUTHORS_LLAMA_MASK})")
        mask = ChannelMask.load(mask_path)
    else:
        model, _ = load_model(model_name, dtype=torch.bfloat16, device=device)
        mask = ChannelMask.load(mask_path or bundled_mask_path(model_name, 0.7))
    return model, mask


def bench(model_name: str, *, mask_path=None, lengths=(8192,), batches=(1,), budget_gib=None, methods=METHODS,
          steps=32, warmup=4, progress=print) -> dict:
    if not torch.cuda.is_available():
        raise LeanKError("leank bench measures GPU decoding: no CUDA device is available")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise LeanKError(f"unknown method(s) {sorted(unknown)}: choose from {', '.join(METHODS)}")
    model, mask = load(model_name, mask_path, torch.device("cuda"))
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
                    res = _guarded(lambda m=method, b=batch, t=length: run_one(model, m, mask, batch=b, length=t,
                                                                                steps=steps, warmup=warmup), None)
                    row = res or {"method": method, "batch": batch, "prompt": length, "oom": True}
                except LeanKError as e:
                    row = {"method": method, "batch": batch, "prompt": length, "error": str(e)}
                if len(both) == 2 and batch == min(both):
                    row["note"] = "largest batch both full and leank fit"
                rows.append(row)
                progress("  " + _fmt(row))
    return {"model": model_name, "mask": str(mask_path or "default"), "rows": rows, "capacity": capacity,
            "summary": summarize(rows, capacity)}


def summarize(rows: list[dict], capacity: list[dict]) -> dict:
    """LeanK vs full (and static) at the largest batch both fit, and cached tokens at the budget."""
    out = {}
    for row in rows:
        if row.get("note") == "largest batch both full and leank fit" and "tokens_per_s" in row:
            out.setdefault(f"prompt {row['prompt']}, batch {row['batch']}", {})[row["method"]] = row["tokens_per_s"]
    ratios = {}
    for key, by_method in out.items():
        if "full" in by_method and "leank" in by_method:
            ratios[key] = {"leank_over_full": by_method["leank"] / by_method["full"]}
            if "static" in by_method:
                ratios[key]["leank_over_static"] = by_method["leank"] / by_method["static"]
    tokens = {}
    for cap in capacity:
        if cap.get("cached_tokens"):
            tokens.setdefault(cap["prompt"], {})[cap["method"]] = cap["cached_tokens"]
    for by_method in tokens.values():
        if "full" in by_method and "leank" in by_method:
            by_method["leank_over_full"] = by_method["leank"] / by_method["full"]
    return {"tokens_per_s": out, "speedup": ratios, "cached_tokens_at_budget": tokens}


def _fmt(row: dict) -> str:
    if row.get("error"):
        return f"{row['method']:>6} B={row['batch']} T={row['prompt']}: {row['error']}"
    if row.get("oom"):
        return f"{row['method']:>6} B={row['batch']} T={row['prompt']}: out of memory"
    return (f"{row['method']:>6} B={row['batch']} T={row['prompt']}: TTFT {row['ttft_s']:.3f} s, "
            f"step {row['step_ms_median']:.2f} ms (mean {row['step_ms_mean']:.2f}), {row['tokens_per_s']:.1f} tok/s, "
            f"peak {row['peak_gib']:.2f} GiB, KV {row['kv_gib']:.3f} GiB (ideal {row['kv_ideal_gib']:.3f})")


def markdown(result: dict, environment: dict) -> str:
    lines = [
        f"# End-to-end decoding: {result['model']}",
        "",
        f"GPU: {environment.get('gpu')}; torch {environment.get('torch')}, transformers "
        f"{environment.get('transformers')}, triton {environment.get('triton')}.",
        f"Command: `{environment.get('command')}`",
        "",
        "| method | batch | prompt | TTFT s | step ms (median) | tokens/s | peak GiB | KV GiB (ideal) | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("oom") or r.get("error"):
            why = "out of memory" if r.get("oom") else r["error"]
            lines.append(f"| {r['method']} | {r['batch']} | {r['prompt']} | {why} | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['prompt']} | {r['ttft_s']:.3f} | {r['step_ms_median']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {r['peak_gib']:.2f} | {r['kv_gib']:.3f} ({r['kv_ideal_gib']:.3f}) | "
            f"{r.get('note', '')} |"
        )
    if result["capacity"]:
        lines += ["", "| method | prompt | budget GiB | max batch | cached tokens | GiB per row |",
                  "|---|---|---|---|---|---|"]
        for c in result["capacity"]:
            lines.append(f"| {c['method']} | {c['prompt']} | {c['budget_gib']} | {c.get('max_batch')} | "
                         f"{c.get('cached_tokens', '')} | {c.get('per_row_gib', float('nan')):.3f} |")
    lines += ["", "Summary: `" + str(result["summary"]) + "`", ""]
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("bench", help="end-to-end decoding benchmark on a GPU: full cache vs LeanK")
    p.add_argument("--model", default="smollm2-135m", help=f"a model name or {LLAMA_8B_SHAPE} (random weights)")
    p.add_argument("--mask", default=None, help="mask file (default: bundled / the authors' Llama mask)")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--budget-gib", type=float, default=None, help="find the largest batch within this memory")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--out", default=None, help="directory for results.json and results.md")
    p.set_defaults(run=_main)


def _main(args) -> int:
    import sys

    from ._env import environment
    from ._io import atomic_write_json, atomic_write_text

    for name, values in (("lengths", args.lengths), ("batches", args.batches)):
        if any(v < 1 for v in values):
            raise LeanKError(f"--{name} must be positive integers, got {values}")
    if args.steps < 1 or args.warmup < 0:
        raise LeanKError("--steps must be >= 1 and --warmup >= 0")
    result = bench(args.model, mask_path=args.mask, lengths=args.lengths, batches=args.batches,
                   budget_gib=args.budget_gib, methods=args.methods, steps=args.steps, warmup=args.warmup)
    env = environment(" ".join(["leank"] + sys.argv[1:]))
    text = markdown(result, env)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "results.json", {"environment": env, **result})
        atomic_write_text(out / "results.md", text)
    return 0
