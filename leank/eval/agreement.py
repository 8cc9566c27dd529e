"""Decode-time agreement with the full cache on long natural text: a finer signal than
task accuracy, and one that needs no answers.

Each text window (bundled prose or a user corpus) is prefilled for ``length`` tokens;
the next ``steps`` tokens are then teacher-forced one at a time through a method's cache.
At every step the method's next-token distribution is compared with the full cache's:
``KL(p_full || p_method)`` (nats) and top-1 agreement. Each window's mean over steps is
one observation; results are mean ± standard error over windows. ``full`` against itself
measures the noise floor (0 on CPU; bf16 kernels may differ slightly).

    specs = parse_methods(["full", "magnitude:0.5", "magnitude:0.7", "leank:mask.safetensors"])
    methods = prepare_methods(specs, model, tok, model_name="smollm2-135m", mask_dir=Path("runs/eval/masks"))
    result = run_agreement(model, tok, methods, AgreementConfig(length=4032), model_name="smollm2-135m",
                           out=Path("runs/eval"))          # writes runs/eval/agreement.json
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._io import atomic_write_json
from ..attention import enable
from ..cache import cache_kwargs
from ..data.text import bundled_prose, load_corpus
from ..errors import LeanKError
from .methods import FullMethod, Method, MethodSpec, token_windows
from .runner import environment


@dataclass(frozen=True)
class AgreementConfig:
    """``length``: prefilled tokens; ``steps``: teacher-forced decode steps compared;
    ``windows``: text windows (observations); ``corpus``: a text file or directory
    (default: the bundled prose)."""

    length: int = 4032
    steps: int = 64
    windows: int = 8
    batch_size: int = 8
    corpus: Path | None = None

    def __post_init__(self) -> None:
        for name in ("length", "steps", "windows", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LeanKError(f"agreement {name} must be a positive integer, got {value!r}")
        if self.corpus is not None:
            object.__setattr__(self, "corpus", Path(self.corpus))


@torch.inference_mode()
def teacher_forced_logprobs(model, method: Method, ids: torch.Tensor, length: int) -> torch.Tensor:
    """Log-probabilities ``[B, T - length, V]`` (fp32) after each of the tokens ``ids[:, length:]``
    fed one at a time, after a prefill of ``ids[:, :length]``, through a fresh cache of ``method``."""
    cache = method.new_cache(model, max_length=ids.shape[1])
    model(input_ids=ids[:, :length], logits_to_keep=1, **cache_kwargs(cache))
    steps = []
    for t in range(length, ids.shape[1]):
        logits = model(input_ids=ids[:, t : t + 1], **cache_kwargs(cache)).logits[:, -1]
        steps.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.stack(steps, dim=1)


def mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of a 1-D tensor (stderr 0 for one value)."""
    n = values.numel()
    stderr = values.std().item() / math.sqrt(n) if n > 1 else 0.0
    return values.mean().item(), stderr


def check_context(model, cfg: AgreementConfig, *, model_name: str) -> None:
    """Raise ``LeanKError`` unless prefill plus steps fit the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and cfg.length + cfg.steps > limit:
        raise LeanKError(f"agreement needs {cfg.length} + {cfg.steps} tokens, more than the {limit}-token context "
                         f"of {model_name}: lower the agreement length")


def run_agreement(
    model, tokenizer, methods: Sequence[Method], cfg: AgreementConfig, *, model_name: str,
    out: Path | None = None, progress: bool = True,
) -> dict:
    """KL divergence and top-1 agreement of each method against the full cache.

    Returns (and writes to ``out/agreement.json`` when ``out`` is given) a dict with the
    settings and one entry per method: ``kl_mean``, ``kl_stderr``, ``top1_mean``,
    ``top1_stderr`` and the per-step means ``kl_per_step``, ``top1_per_step``. An existing
    ``agreement.json`` with the same settings is returned as is.
    """
    enable(model)
    check_context(model, cfg, model_name=model_name)
    total = cfg.length + cfg.steps
    text = load_corpus(cfg.corpus) if cfg.corpus else bundled_prose()
    settings = {
        "model": model_name, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "batch_size"},
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "methods": [m.spec.settings() for m in methods],
    }
    path = out / "agreement.json" if out is not None else None
    if path is not None and path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("settings") == settings:
            return previous

    device = next(model.parameters()).device
    windows = token_windows(tokenizer, text, total, cfg.windows)
    reference = FullMethod(MethodSpec("full"))
    kl = {i: [] for i in range(len(methods))}
    top1 = {i: [] for i in range(len(methods))}
    batches = windows.split(cfg.batch_size)
    with tqdm(total=len(batches) * (len(methods) + 1), desc="agreement", disable=not progress) as bar:
        for batch in batches:
            ids = batch.to(device)
            ref = teacher_forced_logprobs(model, reference, ids, cfg.length)
            bar.update()
            for i, method in enumerate(methods):
                lp = teacher_forced_logprobs(model, method, ids, cfg.length)
                kl[i].append((ref.exp() * (ref - lp)).sum(-1).cpu())  # [b, steps]
                top1[i].append((ref.argmax(-1) == lp.argmax(-1)).float().cpu())
                bar.update()

    entries = []
    for i, method in enumerate(methods):
        kl_all, top1_all = torch.cat(kl[i]).double(), torch.cat(top1[i]).double()  # [windows, steps]
        kl_mean, kl_stderr = mean_stderr(kl_all.mean(1))
        top1_mean, top1_stderr = mean_stderr(top1_all.mean(1))
        entries.append({
            "method": method.spec.label, "family": method.spec.family, "sparsity": round(method.sparsity, 6),
            "kl_mean": kl_mean, "kl_stderr": kl_stderr, "top1_mean": top1_mean, "top1_stderr": top1_stderr,
            "kl_per_step": kl_all.mean(0).tolist(), "top1_per_step": top1_all.mean(0).tolist(),
        })
    result = {"settings": settings, "environment": environment(model), "methods": entries}
    if path is not None:
        atomic_write_json(path, result)
    return result
