"""``leank bench`` under tensor parallelism (transformers ``tp_plan="auto"``): LeanK against the
dense cache under the same parallelism, and greedy tokens against a one-device run (issue 16).

Launched alone (world size 1: the reference, on one GPU or the CPU) or under torchrun (one
process per GPU, NCCL; gloo on the CPU). The model is a random-weight shape of
``leank.models.SHAPES`` (rank 0 builds it with ``--seed``, saves it under ``--scratch`` once,
later runs reuse it) or a model directory; every rank loads it with ``tp_plan="auto"``.

Per point ``BxT`` and method (``full``: ``DynamicCache``; ``leank-eager``: ``LeanKCache`` with
``max_length``; both **eager**: no torch.compile, no CUDA graphs): one row of ``T`` random tokens
is prefilled, the cache repeated to ``B`` rows, then ``--warmup`` + ``--steps`` greedy steps,
each timed (CUDA events; perf_counter on the CPU). Per rank: median step time, KV bytes this
rank holds (``nbytes``, ``ideal_nbytes``, ``dense_nbytes``), peak GPU memory; summed over ranks.
Row 0's greedy tokens and top-5 logits of every step go to ``tokens.json``; with
``--reference`` (a world-size-1 ``tokens.json``) each point and method reports whether the
tokens are identical, the first step where they differ, the reference's top-2 logit gap there
and the largest logit difference up to it (at the reference's top-5 token ids).

    leank bench --tensor-parallel --model llama3.1-8b-shape --lengths 32768 --batches 8 --out tp1
    torchrun --nproc_per_node 2 -m leank.cli bench --model llama3.1-8b-shape --lengths 32768 \
        --batches 8 --reference tp1/tokens.json --out tp2

(``benchmarks/tp_decode.py`` runs :func:`main` with its own options, ``--points 8x32768``.)
Rank 0 writes ``results.json``, ``results.md`` and ``tokens.json`` after every point.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from . import ChannelMask, enable
from ._env import environment
from ._io import atomic_write_json, atomic_write_text, check_writable_dir, make_dirs
from .architectures import check_supported, kv_heads_and_dim
from .cache import cache_kwargs, dense_cache_nbytes
from .errors import LeanKError
from .measure import make_cache, repeat_rows, step_timer
from .models import SHAPES, parse_dtype, shape_config, shape_model
from .parallel import kv_head_rows, launched_world, sum_over_ranks, tensor_parallel
from .resources import bundled_mask_path

TOPK = 5
MARKER = "leank-shape.json"  # written last into a saved shape model: the directory is complete
GIB = 2**30
TP_METHODS = ("full", "leank-eager")  # both eager (the names of `leank bench`; `leank` there is compiled)
SCRATCH = "/tmp/leank-tp-decode"
SCRATCH_HELP = "where a random-weight shape model is saved once and reused (Llama-3.1-8B shape: 16 GB in bf16)"


def argv_from_bench(args) -> list[str]:
    """``leank bench`` options as :mod:`leank.bench_tp` options (the points: every length × batch)."""
    methods = args.methods or list(TP_METHODS)
    other = [m for m in methods if m not in TP_METHODS]
    if other:
        raise LeanKError(f"under tensor parallelism the methods are {' and '.join(TP_METHODS)} (eager), not "
                         f"{', '.join(other)}")
    for name in ("budget_gib", "compile_mode"):
        if getattr(args, name) is not None:
            raise LeanKError(f"--{name.replace('_', '-')} does not apply under tensor parallelism")
    if not args.out:
        raise LeanKError("under tensor parallelism --out is required (results.json, results.md, tokens.json)")
    argv = [f"--model={args.model}", "--points", *[f"{b}x{t}" for t in args.lengths for b in args.batches],
            "--methods", *methods, f"--steps={args.steps}", f"--warmup={args.warmup}", f"--out={args.out}"]
    return argv + [f"--{name}={getattr(args, name)}" for name in ("mask", "reference", "dtype", "scratch")
                   if getattr(args, name)]


def parse_point(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise LeanKError(f"point {text!r} is not BATCHxPROMPT with positive numbers, e.g. 8x32768")
    return int(match[1]), int(match[2])


def model_config(name: str):
    if name in SHAPES:
        return shape_config(name)
    if not (Path(name) / "config.json").is_file():
        raise LeanKError(f"unknown model {name!r}: a tensor-parallel run loads one of {', '.join(SHAPES)} "
                         "(random weights) or a local directory written by save_pretrained")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name)


def setup(world: int):
    """(rank, device): the process group (NCCL on GPUs, gloo on the CPU) when world > 1."""
    if world == 1:
        return 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise LeanKError(f"{world} processes per node but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.distributed.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=20))
    elif torch.distributed.is_available() and torch.distributed.is_gloo_available():
        device = torch.device("cpu")
        torch.distributed.init_process_group("gloo", timeout=timedelta(minutes=20))
    else:
        raise LeanKError("tensor parallelism needs CUDA GPUs (NCCL) or torch.distributed with gloo (CPU)")
    return torch.distributed.get_rank(), device


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def shape_dir(name: str, args, rank: int, world: int, device, dtype) -> tuple[Path, dict]:
    """A saved random-weight model of shape ``name`` (rank 0 builds and saves it unless a
    complete one is there); every rank gets its directory and marker."""
    path = Path(args.scratch) / f"{name}-{str(dtype).removeprefix('torch.')}-seed{args.seed}"
    want = {"name": name, "dtype": str(dtype), "seed": args.seed}
    marker = path / MARKER
    if rank == 0 and not (marker.is_file() and {k: json.loads(marker.read_text()).get(k) for k in want} == want):
        torch.manual_seed(args.seed)
        model = shape_model(name, device=device, dtype=dtype)
        fingerprint = sum(float(p.detach().sum(dtype=torch.float64)) for p in model.parameters())
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        atomic_write_json(tmp / MARKER, {**want, "fingerprint": fingerprint})
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        print(f"saved {name} ({dtype}, seed {args.seed}) to {path}", flush=True)
    barrier(world)
    return path, json.loads(marker.read_text())


def load(path: Path, world: int, device, dtype):
    from transformers import AutoModelForCausalLM

    if world > 1:
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=dtype)
    elif device.type == "cuda":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    enable(model)
    return model.eval()


def local_bytes(model) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())


@torch.inference_mode()
def run_point(model, method, mask, batch, length, args, device, ref) -> dict:
    """One (point, method) on this rank; ``ref``: the reference's entry (top-k ids compared)."""
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(10, model.config.vocab_size - 10, (1, length), generator=gen).to(device)
    n = 1 + args.warmup + args.steps  # tokens: the prompt's, then one per step
    cache = make_cache(method, model, mask, length + n)
    ref_ids = torch.tensor(ref["top_ids"][:n], device=device) if ref else None
    record, elapsed, sync = step_timer(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tops, at_ref, marks = [], [], []

    def observe(logits):
        logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits  # a DTensor: gather it
        row = logits[0, -1].float()
        tops.append(row.topk(TOPK))
        if ref_ids is not None and len(at_ref) < len(ref_ids):
            at_ref.append(row[ref_ids[len(at_ref)]])
        return logits[:, -1].argmax(-1, keepdim=True)

    sync()
    start = time.perf_counter()
    token = observe(model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache)).logits)
    sync()
    ttft = time.perf_counter() - start
    if batch > 1:
        repeat_rows(cache, batch)
        token = token.repeat_interleave(batch, dim=0)
    sync()
    peak_prefill = torch.cuda.max_memory_allocated() / GIB if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            marks.append(record())
        logits = model(input_ids=token, use_cache=True, logits_to_keep=1, **cache_kwargs(cache)).logits
        token = observe(logits)
        if i >= args.warmup:
            marks.append(record())
    sync()
    step_ms = [elapsed(marks[i], marks[i + 1]) for i in range(args.steps)]
    if method != "full":
        kv, ideal, dense = cache.nbytes(), cache.ideal_nbytes(), cache.dense_nbytes()
        overhead = cache.overhead_nbytes()
    else:
        kv = ideal = dense = dense_cache_nbytes(cache)
        overhead = {}
    out = {
        "step_ms": step_ms, "step_ms_median": statistics.median(step_ms), "ttft_s": ttft,
        "kv_bytes": kv, "ideal_bytes": ideal, "dense_bytes": dense, "overhead_bytes": overhead,
        "peak_prefill_gib": peak_prefill, "peak_decode_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "tokens": [int(t.indices[0]) for t in tops],
        "top_ids": [t.indices.tolist() for t in tops], "top_logits": [t.values.tolist() for t in tops],
        "at_ref": [v.tolist() for v in at_ref],
    }
    del cache, logits, token
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def compare(mine: dict, ref: dict | None) -> dict | None:
    """Greedy tokens against the reference; logit differences up to the first differing step."""
    if ref is None:
        return None
    n = min(len(mine["tokens"]), len(ref["tokens"]))
    diff = next((i for i in range(n) if mine["tokens"][i] != ref["tokens"][i]), None)
    upto = n if diff is None else diff + 1  # the differing step's inputs were still identical
    gaps = [v[0] - v[1] for v in ref["top_logits"][:upto]]
    deltas = [max(abs(a - b) for a, b in zip(mine["at_ref"][i], ref["top_logits"][i], strict=True))
              for i in range(upto)]
    return {"identical": diff is None, "steps_compared": n, "first_diff_step": diff,
            "max_abs_logit_diff": max(deltas), "min_ref_top2_gap": min(gaps),
            "ref_top2_gap_at_diff": None if diff is None else gaps[diff],
            "logit_diff_at_diff": None if diff is None else deltas[diff]}


def summarise(per_rank: list[dict], summed: dict, steps_cmp: dict | None, batch: int) -> dict:
    step = max(r["step_ms_median"] for r in per_rank)  # the slowest rank's median
    keep = ("step_ms_median", "ttft_s", "kv_bytes", "ideal_bytes", "dense_bytes", "overhead_bytes",
            "peak_prefill_gib", "peak_decode_gib", "step_ms")
    return {"step_ms_median": step, "tokens_per_s": batch / step * 1e3, "ttft_s": per_rank[0]["ttft_s"],
            **summed, "ranks_agree": all(r["tokens"] == per_rank[0]["tokens"] for r in per_rank),
            "vs_reference": steps_cmp, "per_rank": [{k: r[k] for k in keep} for r in per_rank]}


def table_row(r: dict) -> str:
    ranks, cmp = r["per_rank"], r["vs_reference"]
    peak = "/".join(f"{p['peak_decode_gib']:.1f}" for p in ranks) if ranks[0]["peak_decode_gib"] else "-"
    same = ("-" if cmp is None else "not in the reference" if cmp["identical"] is None else
            "identical" if cmp["identical"] else
            f"differ at step {cmp['first_diff_step']} (ref gap {cmp['ref_top2_gap_at_diff']:.3g}, "
            f"logit diff {cmp['logit_diff_at_diff']:.3g})")
    if cmp is not None and cmp["identical"] is not None:
        same += f"; max logit diff {cmp['max_abs_logit_diff']:.3g}"
    return (f"| {r['point']} | {r['method']} | {r['step_ms_median']:.2f} | {r['tokens_per_s']:.1f} | "
            + "/".join(f"{p['kv_bytes'] / GIB:.4g}" for p in ranks)
            + f" | {r['kv_bytes'] / GIB:.4g} ({r['ideal_bytes'] / GIB:.4g}) | {r['dense_bytes'] / GIB:.4g} | "
            f"{peak} | {same}{'' if r['ranks_agree'] else ' (RANKS DISAGREE)'} |")


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# LeanK under tensor parallelism: {result['model']}, world size {result['world_size']}", "",
             f"{env.get('gpu', 'CPU')}; torch {env['torch']}, transformers {env['transformers']}; {result['dtype']}; "
             f"mask {result['mask']}. Command: `{env['command']}`", "",
             f"Eager (no torch.compile, no CUDA graphs); {result['steps']} timed steps after {result['warmup']} "
             "warm-up; step = the slowest rank's median. KV GiB: bytes each rank's cache holds, and their sum. "
             "Weights GiB per rank: " + "/".join(f"{w:.2f}" for w in result["weight_gib_per_rank"])
             + f"; load {result['load_s']:.0f} s. Reference: {result['reference'] or 'none'}"
             + {None: ".", True: " (same weights).", False: " (**other weights**)."}[result["reference_same_weights"]],
             "",
             "| point | method | step ms | tokens/s | KV GiB per rank | KV GiB sum (ideal) | dense GiB sum | "
             "peak GiB per rank | tokens vs reference |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [table_row(r) for r in result["rows"]]
    by = {(r["point"], r["method"]): r for r in result["rows"]}
    for point in dict.fromkeys(r["point"] for r in result["rows"]):
        if (point, "full") in by and (point, "leank-eager") in by:
            lean, full = by[point, "leank-eager"], by[point, "full"]
            lines.append(f"\n{point}: LeanK holds {lean['kv_bytes'] / full['kv_bytes']:.3f} of the dense KV bytes "
                         f"(summed over ranks), step time {lean['step_ms_median'] / full['step_ms_median']:.2f}x "
                         f"dense, tokens/s {lean['tokens_per_s'] / full['tokens_per_s']:.2f}x.")
    return "\n".join(lines) + "\n"


def gather(obj, world: int) -> list:
    """``obj`` of every rank, in rank order."""
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def check_inputs(args, world: int):
    """Everything that can be refused before a process group or a model exists:
    (config, KV heads, mask, reference or None, dtype)."""
    for p in args.points:
        parse_point(p)
    if args.steps < 1 or args.warmup < 0:
        raise LeanKError("--steps must be at least 1 and --warmup at least 0")
    check_writable_dir(args.out)
    config = model_config(args.model)
    check_supported(config)
    kv_heads, _ = kv_heads_and_dim(config)
    if kv_heads % world or config.num_attention_heads % world:
        raise LeanKError(f"{kv_heads} KV heads / {config.num_attention_heads} attention heads do not split "
                         f"evenly over {world} processes: use a number of processes that divides both")
    mask = ChannelMask.load(args.mask or bundled_mask_path(args.model))  # a shape: its model's (authors') mask
    mask.check_config(config)
    reference = None
    if args.reference:
        try:
            reference = json.loads(Path(args.reference).read_text())
            for by_method in reference["points"].values():
                for entry in by_method.values():
                    if not all(isinstance(entry[k], list) for k in ("tokens", "top_ids", "top_logits")):
                        raise TypeError("tokens, top_ids and top_logits must be lists")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LeanKError(f"cannot read the reference tokens {args.reference} (expected the tokens.json of a "
                             f"run of this benchmark): {e!r}") from None
    dtype = parse_dtype(args.dtype) if args.dtype else torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return config, kv_heads, mask, reference, dtype


def main(argv=None, prog=None, command=None) -> dict | None:
    """Parse ``argv`` and measure; ``command``: how to rerun it, recorded with the results
    (default: this script's command line)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama3.1-8b-shape", help=f"one of {', '.join(SHAPES)} or a model dir")
    parser.add_argument("--mask", default=None, help="mask file (default: the bundled mask, e.g. the authors')")
    parser.add_argument("--points", nargs="+", default=["8x32768", "1x131072"], help="BATCHxPROMPT")
    parser.add_argument("--methods", nargs="+", choices=TP_METHODS, default=list(TP_METHODS))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", default=SCRATCH, help=SCRATCH_HELP)
    parser.add_argument("--reference", default=None, help="tokens.json of a world-size-1 run")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    world = launched_world()
    config, kv_heads, mask, reference, dtype = check_inputs(args, world)

    rank, device = setup(world)
    if args.model in SHAPES:
        path, weights = shape_dir(args.model, args, rank, world, device, dtype)
    else:
        path, weights = Path(args.model), {"dir": str(Path(args.model).resolve())}
    start = time.perf_counter()
    model = load(path, world, device, dtype)
    with torch.inference_mode():  # untimed: CUDA/BLAS/collective first-use costs stay out of the first TTFT
        model(input_ids=torch.arange(10, 26, device=device)[None], use_cache=False)
    load_s = time.perf_counter() - start
    tp = tensor_parallel(model)
    if world > 1 and tp != (rank, world):
        raise LeanKError(f"tp_plan='auto' did not shard the model over the {world} processes (rank {rank} sees "
                         f"{tp}): this transformers version may shard differently")
    heads = kv_head_rows(model, kv_heads)
    ranks = gather({"weight_gib": local_bytes(model) / GIB, "kv_heads": [heads.start, heads.stop]}, world)
    launcher = f"torchrun --nproc_per_node {world} " if world > 1 else "python "
    result = {"model": args.model, "weights": weights, "mask": str(args.mask or "bundled"), "world_size": world,
              "dtype": str(dtype), "eager": True, "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
              "load_s": load_s, "weight_gib_per_rank": [r["weight_gib"] for r in ranks],
              "kv_heads_per_rank": [r["kv_heads"] for r in ranks], "reference": args.reference,
              "reference_same_weights": reference.get("weights") == weights if reference else None,
              "environment": environment(command or launcher + " ".join(sys.argv)), "rows": []}
    tokens = {"model": args.model, "weights": weights, "world_size": world, "dtype": str(dtype), "seed": args.seed,
              "points": {}}
    out = make_dirs(args.out) if rank == 0 else None
    for batch, length in map(parse_point, args.points):
        key = f"{batch}x{length}"
        for method in args.methods:
            ref = reference["points"].get(key, {}).get(method) if reference else None
            row = run_point(model, method, mask, batch, length, args, device, ref)
            summed = {k: sum_over_ranks(row[k]) for k in ("kv_bytes", "ideal_bytes", "dense_bytes")}
            per_rank = gather(row, world)
            if rank != 0:
                continue
            cmp = compare(row, ref) if ref else {"identical": None} if reference else None
            result["rows"].append({"point": key, "batch": batch, "prompt": length, "method": method,
                                   **summarise(per_rank, summed, cmp, batch)})
            tokens["points"].setdefault(key, {})[method] = {k: row[k] for k in ("tokens", "top_ids", "top_logits")}
            atomic_write_json(out / "results.json", result)  # after every point: a cut-short run keeps them
            atomic_write_text(out / "results.md", markdown(result))
            atomic_write_json(out / "tokens.json", tokens)
            print(table_row(result["rows"][-1]), flush=True)
    if rank == 0:
        print(markdown(result), flush=True)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result if rank == 0 else None

