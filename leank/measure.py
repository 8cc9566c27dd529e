"""The pieces of one decode measurement that ``leank bench`` and its tensor-parallel form
(:mod:`leank.bench_tp`) share: a cache by method name, a one-row cache repeated to a batch, and
step timers."""

from __future__ import annotations

import time

import torch

from .cache import LeanKCache
from .masks import ChannelMask
from .quant import parse_quant


def make_cache(method: str, model, mask: ChannelMask | None, max_length: int):
    from transformers import DynamicCache, StaticCache

    if method in ("full", "full-flash"):
        return DynamicCache(config=model.config)
    if method == "full-compiled":
        return StaticCache(config=model.config, max_cache_len=max_length)
    if method == "quantized-int4":  # the evaluation's dense quantised baseline (quanto), as it runs there
        from transformers.cache_utils import QuantizedCache

        from .eval.methods import QUANTIZED_CACHE

        return QuantizedCache(config=model.config, nbits=4, **QUANTIZED_CACHE)
    quant = parse_quant(method.removeprefix("leank-")) if method.startswith("leank-int") else None
    return LeanKCache(model, mask, max_length=max_length, quant=quant)


def repeat_rows(cache, batch: int) -> None:
    """Repeat a one-row cache to ``batch`` rows, layer by layer (transformers' static layers,
    sliding ones included, have no ``batch_repeat_interleave``: their buffers are repeated and
    marked static here)."""
    from transformers.cache_utils import StaticLayer

    for layer in cache.layers:
        if not isinstance(layer, StaticLayer):
            layer.batch_repeat_interleave(batch)
            continue
        layer.keys = layer.keys.repeat_interleave(batch, dim=0)
        layer.values = layer.values.repeat_interleave(batch, dim=0)
        layer.batch_size = batch
        torch._dynamo.mark_static_address(layer.keys)
        torch._dynamo.mark_static_address(layer.values)


def step_timer(device):
    """(record, elapsed_ms(a, b), sync): CUDA events on a GPU, perf_counter elsewhere."""
    if device.type == "cuda":
        event = lambda: torch.cuda.Event(enable_timing=True)
        def record():
            e = event()
            e.record()
            return e
        return record, lambda a, b: a.elapsed_time(b), torch.cuda.synchronize
    return time.perf_counter, lambda a, b: (b - a) * 1e3, lambda: None


def sdpa_backends(method: str):
    """The SDPA backends a method's forwards may use: ``full-flash`` leaves out cuDNN (which
    builds a graph per new sequence length, ~3 ms per layer on an H200 in a training profile:
    every decode step has a new length), the others torch's default choice."""
    import contextlib

    if method != "full-flash":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
