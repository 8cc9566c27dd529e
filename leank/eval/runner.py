"""The evaluation runner: every method on every (task, length), through ``model.generate``.

    cfg = EvalConfig(model="smollm2-135m", methods=("full", "magnitude:0.7"), lengths=(4096,), samples=50)
    results = run_eval(cfg)                      # or: leank eval --model ... --methods ...

Each method answers the same samples with the same user-facing call (batched greedy
``model.generate`` over left-padded prompts, a fresh cache per batch, passed with
``leank.cache_kwargs``). Layout of ``cfg.out``:

    results.json                              every finished run's metrics
    masks/                                    calibrated magnitude masks, reused by later runs
    <method>/<task>/<length>/predictions.jsonl
    <method>/<task>/<length>/metrics.json     written last: its presence marks a finished run

A run whose ``metrics.json`` records the same settings is skipped, so an interrupted
evaluation resumes where it stopped.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from .._io import atomic_write_json, atomic_write_text, check_writable_dir
from ..attention import enable
from ..cache import cache_kwargs
from ..data.ruler_jsonl import load_ruler_jsonl, task_from_path
from ..data.tasks import TASKS, Sample, encode_prompt, generate_task
from ..errors import LeanKError
from ..models import load_model, parse_dtype
from .methods import Method, MethodSpec, file_sha256, parse_methods, prepare_method, slugify
from .metrics import score
from .report import collect_results

RULER_QA_TOKENS = 32  # RULER's tokens_to_generate for qa_*; its other tasks are in TASKS


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate. ``tasks``: RULER task names (default all of ``TASKS``); ``lengths``:
    total tokens (prompt + answer budget) per sample; ``samples``: per task and length;
    ``ruler_jsonl``: RULER task files, each run as one more task (``ruler-<name>``) at its
    own length; ``alignment``: of the magnitude and random masks' per-head counts."""

    model: str
    methods: tuple[str, ...]
    tasks: tuple[str, ...] = tuple(TASKS)
    lengths: tuple[int, ...] = (4096,)
    samples: int = 50
    batch_size: int = 8
    seed: int = 0
    out: Path = Path("runs/eval")
    ruler_jsonl: tuple[Path, ...] = ()
    alignment: int = 16
    device: str | None = None
    dtype: str | None = None
    method_specs: tuple[MethodSpec, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("methods", "tasks", "lengths", "ruler_jsonl"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "ruler_jsonl", tuple(Path(p) for p in self.ruler_jsonl))
        specs = parse_methods(self.methods, alignment=self.alignment, seed=self.seed)
        object.__setattr__(self, "method_specs", tuple(specs))
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise LeanKError(f"unknown task(s) {', '.join(unknown)}: use any of {', '.join(TASKS)}")
        if not self.tasks and not self.ruler_jsonl:
            raise LeanKError("nothing to evaluate: give tasks or RULER JSONL files")
        if self.tasks and (not self.lengths or any(not isinstance(n, int) or n <= 0 for n in self.lengths)):
            raise LeanKError(f"lengths must be positive token counts, got {list(self.lengths)}")
        if self.tasks:
            task = max(self.tasks, key=lambda t: TASKS[t].tokens_to_generate)
            budget, shortest = TASKS[task].tokens_to_generate, min(self.lengths)
            if shortest <= budget:
                raise LeanKError(
                    f"length {shortest} leaves no room for a prompt: a length counts prompt + answer, and {task} "
                    f"answers in up to {budget} tokens; use lengths well above {budget} (e.g. 1024)")
        for name in ("samples", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LeanKError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for path in self.ruler_jsonl:
            if not path.is_file():
                raise LeanKError(f"RULER task file {path} does not exist: pass the path of a .jsonl file")
        if self.dtype is not None:
            parse_dtype(self.dtype)


@dataclass(frozen=True)
class TaskUnit:
    """One task at one length: the samples every method answers."""

    task: str
    length: int
    tokens_to_generate: int
    ruler_file: Path | None = None

    def load(self, tokenizer, *, samples: int, seed: int) -> list[Sample]:
        if self.ruler_file is None:
            return generate_task(self.task, tokenizer, self.length - self.tokens_to_generate, samples, seed)
        return load_ruler_jsonl(self.ruler_file)[:samples]

    def source(self) -> str:
        if self.ruler_file is None:
            return "generated"
        return f"{self.ruler_file} sha256:{file_sha256(self.ruler_file)}"


def ruler_unit(path: Path) -> TaskUnit:
    """A RULER file as a task: length from the ``<length>/data/<task>/`` folder RULER writes,
    else the largest ``length`` field of its records; RULER's answer budget for the task."""
    task = task_from_path(path)
    digits = [part for part in reversed(path.parent.parts) if part.isdigit()]
    length = int(digits[0]) if digits else max(s.length for s in load_ruler_jsonl(path))
    if length <= 0:
        raise LeanKError(f"cannot tell the context length of {path}: keep RULER's <length>/data/<task>/ "
                         "folders or give its records a 'length' field")
    budget = TASKS[task].tokens_to_generate if task in TASKS else RULER_QA_TOKENS if task.startswith("qa") else 128
    return TaskUnit(f"ruler-{task}", length, budget, path)


def task_units(cfg: EvalConfig) -> list[TaskUnit]:
    units = [TaskUnit(t, n, TASKS[t].tokens_to_generate) for n in cfg.lengths for t in cfg.tasks]
    return units + [ruler_unit(p) for p in cfg.ruler_jsonl]


def run_dir(out: Path, spec: MethodSpec, unit: TaskUnit) -> Path:
    return out / spec.slug / slugify(unit.task) / str(unit.length)


def is_finished(directory: Path, settings: dict) -> bool:
    path = directory / "metrics.json"
    try:
        return json.loads(path.read_text())["settings"] == settings
    except (OSError, ValueError, KeyError):
        return False


def environment(model) -> dict:
    """Device, GPU, versions and the command line, recorded next to every result."""
    import transformers

    device = next(model.parameters()).device
    return {
        "command": shlex.join(sys.argv),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": {"leank": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


def max_context(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@torch.inference_mode()
def generate_batch(
    model, tokenizer, method: Method, prompts: Sequence[list[int]], max_new_tokens: int
) -> tuple[list[str], tuple[int, int], float]:
    """Greedy answers for token-id prompts (left-padded into one batch), the cache's
    ``(bytes held, dense bytes)`` and the seconds ``generate`` took."""
    batch = tokenizer.pad({"input_ids": list(prompts)}, padding=True, padding_side="left", return_tensors="pt")
    batch = batch.to(model.device)
    width = batch["input_ids"].shape[1]
    cache = method.new_cache(model, max_length=width + max_new_tokens)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    start = time.perf_counter()
    # Eager for every method: a static LeanK cache would make generate() compile the decode
    # step on CUDA, once per batch (a new cache and width each time), for no accuracy change.
    out = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        disable_compile=True, **cache_kwargs(cache),
    )
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True), method.kv_bytes(cache), seconds


def evaluate_unit(
    model, tokenizer, method: Method, unit: TaskUnit, samples: list[Sample], prompts: list[list[int]], *,
    batch_size: int, progress: tqdm,
) -> tuple[list[dict], dict]:
    """Answer ``samples`` in batches of similar length; return per-sample records and metrics."""
    order = sorted(range(len(samples)), key=lambda i: -len(prompts[i]))  # longest first: OOM shows early
    predictions: list[str] = [""] * len(samples)
    held = dense = 0
    seconds = 0.0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        texts, (batch_held, batch_dense), batch_seconds = generate_batch(
            model, tokenizer, method, [prompts[i] for i in rows], unit.tokens_to_generate
        )
        for i, text in zip(rows, texts, strict=True):
            predictions[i] = text
        held, dense, seconds = held + batch_held, dense + batch_dense, seconds + batch_seconds
        progress.update(len(rows))
    records = [
        {"index": s.index, "prompt_tokens": len(p), "prediction": pred, "references": s.outputs,
         "score": score(s.metric, [pred], [s.outputs])}
        for s, p, pred in zip(samples, prompts, predictions, strict=True)
    ]
    n = len(samples)
    metrics = {
        "method": method.spec.label, "family": method.spec.family, "task": unit.task, "length": unit.length,
        "metric": samples[0].metric, "score": score(samples[0].metric, predictions, [s.outputs for s in samples]),
        "n": n, "sparsity": round(method.sparsity, 6), "kv_bytes_per_sample": held / n,
        "dense_kv_bytes_per_sample": dense / n, "kv_fraction": held / dense,
        "kv_bytes_kind": method.bytes_kind, "seconds": round(seconds, 3),
        "prompt_tokens_mean": sum(len(p) for p in prompts) / n, "tokens_to_generate": unit.tokens_to_generate,
    }
    return records, metrics


def write_summary(out: Path) -> Path:
    return atomic_write_json(out / "results.json", {"results": collect_results(out)})


@dataclass(frozen=True)
class PendingRun:
    """A (method, task, length) without a finished result, and the settings it will record."""

    unit: TaskUnit
    spec: MethodSpec
    directory: Path
    settings: dict = field(hash=False)


def run_identity(cfg: EvalConfig, *, dtype: str) -> dict:
    """What every run in one results directory shares: the model and the generation settings."""
    return {"model": cfg.model, "dtype": dtype, "samples": cfg.samples, "seed": cfg.seed}


def default_dtype(cfg: EvalConfig) -> str:
    """The dtype ``load_model`` will use for ``cfg`` (known before the model is loaded)."""
    from ..models import check_device

    if cfg.dtype is not None:
        return str(parse_dtype(cfg.dtype)).removeprefix("torch.")
    return "bfloat16" if check_device(cfg.device).type == "cuda" else "float32"


def check_results_dir(out: Path, identity: dict) -> None:
    """Refuse a results directory holding runs of another model or other generation settings:
    a directory belongs to one model and one set of settings (its runs are compared in one report)."""
    for path in sorted(Path(out).glob("*/*/*/metrics.json")):
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable: that run is redone (or the report names the file)
        diff = [k for k in identity if k in settings and settings[k] != identity[k]]
        if diff:
            theirs = ", ".join(f"{k} {settings[k]!r}" for k in diff)
            ours = ", ".join(f"{k} {identity[k]!r}" for k in diff)
            raise LeanKError(f"{out} holds results with {theirs} ({path.parent.relative_to(out)}), not {ours}: "
                             "a results directory is for one model and one set of settings; pass another --out "
                             "(or the same settings to resume)")
    agreement = Path(out) / "agreement.json"
    if agreement.is_file():
        try:
            model = json.loads(agreement.read_text(encoding="utf-8"))["settings"]["model"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        if model != identity["model"]:
            raise LeanKError(f"{out} holds the decode agreement of model {model!r}, not {identity['model']!r}: "
                             "pass another --out")


def plan_runs(cfg: EvalConfig, *, dtype: str) -> tuple[list[PendingRun], int]:
    """The runs still to do, in (length, task, method) order, and how many are finished."""
    common = run_identity(cfg, dtype=dtype)
    pending, finished = [], 0
    for unit in task_units(cfg):
        source = unit.source()
        for spec in cfg.method_specs:
            settings = {**common, "source": source, "method": spec.settings()}
            directory = run_dir(cfg.out, spec, unit)
            if is_finished(directory, settings):
                finished += 1
            else:
                pending.append(PendingRun(unit, spec, directory, settings))
    return pending, finished


def load_prompts(unit: TaskUnit, tokenizer, cfg: EvalConfig, limit: int | None) -> tuple[list[Sample], list[list[int]]]:
    """A unit's samples and their token ids; ``LeanKError`` if one cannot fit the context with its answer."""
    samples = unit.load(tokenizer, samples=cfg.samples, seed=cfg.seed)
    prompts = [encode_prompt(tokenizer, s.prompt) for s in samples]
    longest = max(len(p) for p in prompts) + unit.tokens_to_generate
    if limit is not None and longest > limit:
        raise LeanKError(f"{unit.task}: a prompt plus its {unit.tokens_to_generate}-token answer needs {longest} "
                         f"tokens, more than the {limit}-token context of {cfg.model}")
    return samples, prompts


def run_eval(cfg: EvalConfig, *, model=None, tokenizer=None, progress: bool = True) -> list[dict]:
    """Run every unfinished (method, task, length) of ``cfg``; return all finished results.

    ``model``/``tokenizer``: an already loaded pair (else ``cfg.model`` is loaded with
    ``cfg.device`` and ``cfg.dtype``); ``cfg.model`` names it in the results. Bad input
    (lengths the model cannot take, masks for another model, too-short lengths) raises
    ``LeanKError`` before any generation.
    """
    if (model is None) != (tokenizer is None):
        raise LeanKError("pass both a model and its tokenizer to run_eval, or neither")
    if model is None:
        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    if tokenizer.pad_token_id is None:
        raise LeanKError("the tokenizer has no pad token: set tokenizer.pad_token = tokenizer.eos_token")
    enable(model)
    limit = max_context(model)
    if cfg.tasks and limit is not None and max(cfg.lengths) > limit:
        raise LeanKError(f"length {max(cfg.lengths)} exceeds the {limit}-token context of {cfg.model}: "
                         f"use lengths up to {limit}")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    check_results_dir(cfg.out, run_identity(cfg, dtype=dtype))
    check_writable_dir(cfg.out)
    pending, finished = plan_runs(cfg, dtype=dtype)
    if finished:
        tqdm.write(f"skipping {finished} finished run(s) in {cfg.out}")

    # Everything that can fail on bad input happens here, before the first generate().
    methods = {
        spec: prepare_method(spec, model, tokenizer, model_name=cfg.model, mask_dir=cfg.out / "masks")
        for spec in dict.fromkeys(run.spec for run in pending)
    }
    data = {unit: load_prompts(unit, tokenizer, cfg, limit) for unit in dict.fromkeys(run.unit for run in pending)}

    env = environment(model)
    with tqdm(total=sum(len(data[run.unit][0]) for run in pending), desc="eval", unit="sample",
              disable=not progress) as bar:
        for run in pending:
            bar.set_postfix_str(f"{run.spec.label} {run.unit.task} {run.unit.length}")
            records, metrics = evaluate_unit(
                model, tokenizer, methods[run.spec], run.unit, *data[run.unit], batch_size=cfg.batch_size,
                progress=bar,
            )
            metrics.update(env, model=cfg.model, dtype=dtype, batch_size=cfg.batch_size, settings=run.settings,
                           finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
            atomic_write_text(run.directory / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            atomic_write_json(run.directory / "metrics.json", metrics)
            write_summary(cfg.out)
    write_summary(cfg.out)
    return collect_results(cfg.out)


def run_eval_in_processes(cfg: EvalConfig, jobs: int, *, progress: bool = True) -> list[dict]:
    """:func:`run_eval` with each method in its own process, ``jobs`` at a time, all into
    ``cfg.out``; return all finished results.

    Evaluation is bound by the host (a decode step is many small launches), so on one GPU several
    methods run side by side at nearly the speed of one: on an H200, seven SmolLM2 evaluations at
    once each kept 3.5–8 samples/s (docs/LOG.md). Each process loads the model itself; a method that
    fails does not stop the others, and the failures are raised together at the end (finished runs
    are kept: the same command resumes). Ctrl-C stops every process at once.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    failed = []
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_ignore_sigint)
    try:
        futures = {pool.submit(_eval_one, replace(cfg, methods=(method,))): method for method in cfg.methods}
        bar = tqdm(cf.as_completed(futures), total=len(futures), desc="methods", unit="method", disable=not progress)
        for future in bar:
            method = futures[future]
            try:
                future.result()
                bar.write(f"finished {method}")
            except Exception as e:  # noqa: BLE001 - reported with the method's name, the others go on
                failed.append(f"{method}: {e if isinstance(e, LeanKError) else f'{type(e).__name__}: {e}'}")
    except BaseException:  # Ctrl-C (the workers ignore it): nothing new starts, the running ones stop
        workers = list((pool._processes or {}).values())  # shutdown forgets them
        pool.shutdown(wait=False, cancel_futures=True)
        for process in workers:
            process.terminate()
        for process in workers:
            process.join(timeout=10)
        raise
    pool.shutdown()
    write_summary(cfg.out)
    if failed:
        raise LeanKError("; ".join(failed))
    return collect_results(cfg.out)


def _eval_one(cfg: EvalConfig) -> None:
    run_eval(cfg, progress=False)


def _ignore_sigint() -> None:
    """In each worker: Ctrl-C is the parent's to handle (it cancels what has not started and
    ends the workers; finished runs are on disk, and the same command resumes)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)

