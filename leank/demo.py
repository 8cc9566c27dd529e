"""``leank demo``: a needle in a ~2K-token haystack, answered with the full KV cache and
with the LeanK cache, on the bundled SmolLM2-135M and mask, on CPU.

    leank demo                     # defaults: smollm2-135m, bundled mask, 2048 tokens
    leank demo --length 4096 --mask my.leank-mask.safetensors
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .cache import LeanKCache, cache_kwargs, dense_cache_nbytes
from .masks import ChannelMask
from .models import load_model
from .resources import bundled_mask_path


@dataclass
class DemoRun:
    name: str
    answer: str
    correct: bool
    kv_bytes: int
    seconds: float


def _generate(model, tokenizer, prompt: str, cache, max_new_tokens: int) -> tuple[str, float]:
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    start = time.perf_counter()
    # Eager for both caches (on CUDA a static LeanK cache would otherwise be compiled first,
    # and the one generate() timed here would mostly measure the compilation).
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        disable_compile=True, **cache_kwargs(cache),
    )
    seconds = time.perf_counter() - start
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    return text.strip(), seconds


def run_demo(
    *, model_name: str = "smollm2-135m", mask_path: str | None = None, length: int = 2048, seed: int = 0,
    task: str = "niah_single_1", max_new_tokens: int = 16, device: str | None = "cpu",
) -> tuple[list[DemoRun], ChannelMask, LeanKCache, int]:
    """Run both caches on one sample; returns the two runs, the mask, the LeanK cache and the prompt length."""
    from .data.tasks import generate_task
    from .models import check_device, check_length
    mask = ChannelMask.load(mask_path or bundled_mask_path(model_name))  # a clear error when none fits
    check_length(None, length)  # positive; the model's context is checked once it is loaded
    check_device(device)
    model, tokenizer = load_model(model_name, device=device)
    mask.check_config(model.config)
    check_length(model, length + max_new_tokens, "--length plus the answer")
    sample = generate_task(task, tokenizer, length, 1, seed)[0]
    prompt_len = len(tokenizer(sample.prompt, add_special_tokens=False).input_ids)

    runs = []
    dense = DynamicCache(config=model.config)  # as transformers' default: sliding layers keep their window
    with torch.inference_mode():
        answer, seconds = _generate(model, tokenizer, sample.prompt, dense, max_new_tokens)
    runs.append(DemoRun("full cache", answer, _correct(answer, sample), dense_cache_nbytes(dense), seconds))

    cache = LeanKCache(model, mask, max_length=prompt_len + max_new_tokens)
    with torch.inference_mode():
        answer, seconds = _generate(model, tokenizer, sample.prompt, cache, max_new_tokens)
    runs.append(DemoRun("LeanK cache", answer, _correct(answer, sample), cache.nbytes(), seconds))
    return runs, mask, cache, prompt_len


def _correct(answer: str, sample) -> bool:
    return all(ref.lower() in answer.lower() for ref in sample.outputs)


def main(args) -> int:
    runs, mask, cache, prompt_len = run_demo(
        model_name=args.model, mask_path=args.mask, length=args.length, seed=args.seed, device=args.device
    )
    mib = 1024**2
    print(f"\nLeanK demo: {args.model}, needle in a {prompt_len}-token haystack ({args.device}, float32)")
    print(
        f"mask: {mask.method} ({'learned' if mask.method.startswith('leank') else 'not learned'}), "
        f"{mask.sparsity:.0%} of K channels pruned, {mask.fully_pruned_heads}/{mask.num_layers * mask.num_kv_heads} "
        f"heads fully pruned; sink {cache.sink}, recent {cache.recent} tokens"
    )
    print(f"\n{'':<12} {'answer':<28} {'correct':<8} {'KV bytes':>12} {'time':>8}")
    for r in runs:
        answer = r.answer if len(r.answer) <= 26 else r.answer[:23] + "..."
        print(f"{r.name:<12} {answer!r:<28} {'yes' if r.correct else 'no':<8} "
              f"{r.kv_bytes / mib:>9.2f} MiB {r.seconds:>7.1f}s")
    full, lean = runs
    print(
        f"\nKV cache: {lean.kv_bytes / mib:.2f} MiB vs {full.kv_bytes / mib:.2f} MiB, "
        f"saving {1 - lean.kv_bytes / full.kv_bytes:.1%} (ideal for this mask: "
        f"{1 - cache.ideal_nbytes() / cache.dense_nbytes():.1%})"
    )
    return 0
