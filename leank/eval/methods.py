"""Evaluation methods behind one interface, parsed from strings:

    full                    transformers' DynamicCache (the "leank" attention runs SDPA on it): the reference
    leank:PATH              a mask file, on the real compressed LeanKCache
    magnitude:S             static magnitude mask, global budget (leank.calibrate), LeanKCache
    magnitude-per-head:S    the same with every head keeping the same count
    random:S                a random static mask (seeded), LeanKCache
    think:S                 ThinK, channels chosen per prompt (exact simulation, leank.eval.think)
    leank:PATH+int8         a mask method with its middle store quantised (leank.quant: int8, int4,
    magnitude:S+int4        int4g64, ...); any of the mask methods above takes the suffix
    quantized:int4          transformers' QuantizedCache (quanto, per-token groups of 64, a
                            residual of 128 full tokens): the dense quantised baseline

``S`` is the fraction of K channels pruned. Magnitude masks are calibrated on the bundled
prose once per model and saved under ``mask_dir``; later runs load them.

    specs = [parse_method(s, alignment=16, seed=0) for s in ("full", "magnitude:0.7", "think:0.7")]
    methods = prepare_methods(specs, model, tokenizer, model_name="smollm2-135m", mask_dir="runs/eval/masks")
    cache = methods[1].new_cache(model, max_length=4200)
    model.generate(..., **leank.cache_kwargs(cache)); held, dense = methods[1].kv_bytes(cache)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from ..cache import LeanKCache, dense_cache_nbytes
from ..calibrate import magnitude_mask
from ..data.text import bundled_prose
from ..errors import LeanKError
from ..masks import DEFAULT_RECENT, DEFAULT_SINK, ChannelMask, check_sparsity, hybrid_layers, kv_shape
from ..quant import KVQuant, parse_quant
from .think import DEFAULT_WINDOW, ThinKCache, kept_channel_count

STATIC_KINDS = ("magnitude", "magnitude-per-head", "random")
KINDS = ("full", "leank", *STATIC_KINDS, "think", "quantized")
MASK_KINDS = ("leank", *STATIC_KINDS)
QUANTIZED_CACHE = dict(backend="quanto", q_group_size=64, residual_length=128)  # transformers' defaults
CALIBRATION_LENGTH = 2048
CALIBRATION_WINDOWS = 4


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method string plus the settings that change its results.

    ``alignment`` applies to the magnitude and random masks, ``seed`` to the random
    mask, ``window`` to ThinK; ``quant`` (a mask method's quantised middle store, or the
    QuantizedCache's bits) is a :class:`~leank.quant.KVQuant` or None.
    """

    kind: str
    sparsity: float | None = None
    path: Path | None = None
    alignment: int = 16
    seed: int = 0
    window: int = DEFAULT_WINDOW
    quant: KVQuant | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LeanKError(f"unknown method {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.kind == "leank":
            if self.path is None or not Path(self.path).is_file():
                raise LeanKError(f"leank:PATH needs an existing mask file, got {self.path}")
        elif self.kind == "quantized":
            q = self.quant
            if q is None or q.bits not in (2, 4) or q.symmetric or q.rotate or q.group != 32:
                raise LeanKError("quantized:BITS (transformers' QuantizedCache, its own groups) takes int4 (or int2)")
        elif self.kind != "full":
            check_sparsity(self.sparsity)
        if self.quant is not None and self.kind not in (*MASK_KINDS, "quantized"):
            raise LeanKError(f"method {self.kind} has no quantised variant: +int8/+int4 follow a mask method")

    @property
    def family(self) -> str:
        """The curve a method belongs to in tables and plots: its kind, plus its quantisation."""
        if self.kind == "quantized":
            return f"quantized:int{self.quant.bits}"
        return f"{self.kind}+{self.quant.label}" if self.quant else self.kind

    @property
    def label(self) -> str:
        """How tables and plots name the method: ``magnitude:0.7``, ``leank:<file stem>``."""
        if self.kind == "full":
            return "full"
        if self.kind == "quantized":
            return self.family
        suffix = f"+{self.quant.label}" if self.quant else ""
        if self.kind == "leank":
            return f"leank:{Path(self.path).name.removesuffix('.safetensors')}{suffix}"
        return f"{self.kind}:{self.sparsity:g}{suffix}"

    @property
    def slug(self) -> str:
        """The method's directory name in a results directory."""
        return slugify(self.label)

    def settings(self) -> dict:
        """Everything that determines this method's predictions (a finished run is reused
        only when they match); a mask file counts by its content."""
        base = {"label": self.label}
        if self.kind == "leank":
            base["mask_sha256"] = file_sha256(self.path)
        elif self.kind in STATIC_KINDS:
            base["alignment"] = self.alignment
            if self.kind == "random":
                base["seed"] = self.seed
        elif self.kind == "think":
            base.update(window=self.window, sink=DEFAULT_SINK, recent=DEFAULT_RECENT)
        elif self.kind == "quantized":
            base.update(QUANTIZED_CACHE)
        if self.quant is not None:
            base["quant"] = {"bits": self.quant.bits, "group": self.quant.group}
            for flag in ("symmetric", "rotate"):  # (only when set: earlier runs' configs stay as they were)
                if getattr(self.quant, flag):
                    base["quant"][flag] = True
        return base


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def slugify(name: str) -> str:
    """A file-system-safe name: runs of anything but letters, digits, ``.``, ``_``, ``-`` become ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def parse_method(text: str, *, alignment: int = 16, seed: int = 0) -> MethodSpec:
    """``full``, ``leank:PATH``, ``magnitude:0.7``, ``magnitude-per-head:0.7``, ``random:0.7``, ``think:0.7``,
    a mask method with ``+int8``/``+int4`` (quantised middle store), ``quantized:int4``."""
    kind, sep, arg = text.partition(":")
    if kind == "quantized":
        if not arg:
            raise LeanKError(f"method {text!r} needs the bits: quantized:int4")
        return MethodSpec("quantized", quant=parse_quant(arg))
    base, plus, quant_text = arg.rpartition("+")
    quant = None
    if plus and quant_text.startswith("int"):
        if kind not in MASK_KINDS:
            raise LeanKError(f"method {text!r}: {kind} has no quantised variant (+int8/+int4 follow a mask method: "
                             f"{', '.join(MASK_KINDS)})")
        arg, quant = base, parse_quant(quant_text)
    if kind not in KINDS:
        raise LeanKError(f"unknown method {text!r}: use full, leank:PATH, or one of "
                         f"{', '.join(k + ':SPARSITY' for k in (*STATIC_KINDS, 'think'))}")
    if kind == "full":
        if sep:
            raise LeanKError(f"method 'full' takes no argument, got {text!r}")
        return MethodSpec("full")
    if not arg:
        what = "a mask file (leank:PATH)" if kind == "leank" else f"a sparsity ({kind}:0.7)"
        raise LeanKError(f"method {text!r} needs {what}")
    if kind == "leank":
        return MethodSpec("leank", path=Path(arg), quant=quant)
    try:
        sparsity = float(arg)
    except ValueError:
        raise LeanKError(f"method {text!r}: {arg!r} is not a sparsity; write e.g. {kind}:0.7") from None
    return MethodSpec(kind, sparsity=sparsity, alignment=alignment, seed=seed, quant=quant)


def parse_methods(texts: Sequence[str], *, alignment: int = 16, seed: int = 0) -> list[MethodSpec]:
    """:func:`parse_method` for each string; two methods with the same label are an error."""
    specs = [parse_method(t, alignment=alignment, seed=seed) for t in texts]
    if not specs:
        raise LeanKError("no method given: pass e.g. full magnitude:0.7")
    labels = [s.label for s in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise LeanKError(f"methods given twice (or mask files with the same name): {', '.join(duplicates)}")
    return specs


class Method(Protocol):
    """A prepared method: makes a fresh cache per batch and counts the bytes it holds."""

    spec: MethodSpec
    sparsity: float
    bytes_kind: str  # "allocated" (bytes the cache holds) or "ideal (simulated)"

    def new_cache(self, model, *, max_length: int | None = None) -> Cache: ...

    def kv_bytes(self, cache: Cache) -> tuple[int, int]:
        """``(bytes held, bytes a DynamicCache would hold)`` for a cache after generation."""
        ...


@dataclass(frozen=True)
class FullMethod:
    spec: MethodSpec
    sparsity: float = 0.0
    bytes_kind: str = "allocated"

    def new_cache(self, model, *, max_length: int | None = None) -> Cache:
        return DynamicCache(config=model.config)  # sliding layers keep their window, as transformers' default

    def kv_bytes(self, cache: Cache) -> tuple[int, int]:
        held = dense_cache_nbytes(cache)
        return held, held


@dataclass(frozen=True)
class MaskMethod:
    """A static channel mask on the real compressed :class:`~leank.cache.LeanKCache`."""

    spec: MethodSpec
    mask: ChannelMask
    bytes_kind: str = "allocated"

    @property
    def sparsity(self) -> float:
        return self.mask.sparsity

    def new_cache(self, model, *, max_length: int | None = None) -> Cache:
        return LeanKCache(model, self.mask, max_length=max_length, quant=self.spec.quant)

    def kv_bytes(self, cache: Cache) -> tuple[int, int]:
        return cache.nbytes(), cache.dense_nbytes()


@dataclass(frozen=True)
class ThinKMethod:
    """ThinK on the simulated :class:`~leank.eval.think.ThinKCache` (ideal bytes reported)."""

    spec: MethodSpec
    sparsity: float
    bytes_kind: str = "ideal (simulated)"

    def new_cache(self, model, *, max_length: int | None = None) -> Cache:
        return ThinKCache(model, sparsity=self.spec.sparsity, window=self.spec.window)

    def kv_bytes(self, cache: Cache) -> tuple[int, int]:
        return cache.ideal_nbytes(), cache.dense_nbytes()


@dataclass(frozen=True)
class QuantizedCacheMethod:
    """transformers' ``QuantizedCache`` (quanto): the dense quantised baseline. It keeps the last
    ``residual_length`` tokens in full and dequantises the whole cache at every step."""

    spec: MethodSpec
    sparsity: float = 0.0
    bytes_kind: str = "allocated"

    def new_cache(self, model, *, max_length: int | None = None) -> Cache:
        from transformers.cache_utils import QuantizedCache

        return QuantizedCache(config=model.config, nbits=self.spec.quant.bits, **QUANTIZED_CACHE)

    def kv_bytes(self, cache: Cache) -> tuple[int, int]:
        return quantized_cache_nbytes(cache)


def quantized_cache_nbytes(cache: Cache) -> tuple[int, int]:
    """(held, dense) bytes of a ``QuantizedCache``: packed codes, scales and shifts of the quantised
    part plus the full-precision residual; the dense cache of the same tokens."""
    held = dense = 0
    for layer in cache.layers:
        for q in (layer._quantized_keys, layer._quantized_values):
            data = q._data._data if hasattr(q._data, "_data") else q._data
            held += sum(t.numel() * t.element_size() for t in (data, q._scale, q._shift))
        held += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        # the residual is an empty 1-D tensor right after each quantisation; the codes keep the 4-D shape
        B, H, _, D = layer._quantized_keys.shape
        dense += 2 * B * H * int(layer.cumulative_length) * D * layer._quantized_keys.dtype.itemsize
    return held, dense


def check_quantized_cache() -> None:
    """QuantizedCache needs optimum-quanto: fail before any generation without it."""
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        raise LeanKError("transformers' QuantizedCache (quantized:int4 in leank eval, quantized-int4 in leank bench) "
                         "needs optimum-quanto: pip install optimum-quanto") from None


def token_windows(tokenizer, text: str, length: int, count: int) -> torch.Tensor:
    """The first ``count`` consecutive ``length``-token windows of ``text``, long ``[count, length]``."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < length * count:
        raise LeanKError(f"the text has {ids.numel()} tokens, fewer than {count} windows of {length}: "
                         "use fewer or shorter windows, or a longer corpus")
    return ids[: length * count].view(count, length)


def calibrated_mask(spec: MethodSpec, model, tokenizer, *, model_name: str, mask_dir: Path) -> ChannelMask:
    """The magnitude mask of ``spec``, loaded from ``mask_dir`` or calibrated and saved there."""
    path = Path(mask_dir) / f"{slugify(model_name)}.{spec.slug}.align{spec.alignment}.safetensors"
    if path.is_file():
        mask = ChannelMask.load(path)
        if mask.model != model_name:
            raise LeanKError(f"{path} was calibrated for {mask.model!r}, not {model_name!r}: delete it "
                             "or use another results directory")
        return mask
    length = min(CALIBRATION_LENGTH, getattr(model.config, "max_position_embeddings", CALIBRATION_LENGTH))
    windows = token_windows(tokenizer, bundled_prose(), length, CALIBRATION_WINDOWS)
    mask = magnitude_mask(
        model, windows.split(1), sparsity=spec.sparsity, alignment=spec.alignment,
        per_head=spec.kind == "magnitude-per-head", model_name=model_name, progress=False,
        info={"calibration_tokens": windows.numel(), "corpus": "bundled prose"},
    )
    mask.save(path)
    return mask


def prepare_method(spec: MethodSpec, model, tokenizer, *, model_name: str, mask_dir: Path) -> Method:
    """Load, check or calibrate what ``spec`` needs for ``model``; raise ``LeanKError`` on a
    mask for another model (before any generation)."""
    if spec.kind == "full":
        return FullMethod(spec)
    if spec.kind == "quantized":
        check_quantized_cache()
        return QuantizedCacheMethod(spec)
    if spec.kind == "think":
        head_dim = kv_shape(model.config)[2]
        return ThinKMethod(spec, sparsity=1 - kept_channel_count(spec.sparsity, head_dim) / head_dim)
    if spec.kind == "leank":
        mask = ChannelMask.load(spec.path)
    elif spec.kind == "random":
        mask = ChannelMask.random(
            *kv_shape(model.config), sparsity=spec.sparsity, alignment=spec.alignment,
            generator=torch.Generator().manual_seed(spec.seed), model=model_name, layers=hybrid_layers(model.config),
        )
    else:
        mask = calibrated_mask(spec, model, tokenizer, model_name=model_name, mask_dir=mask_dir)
    try:
        mask.check_config(model.config)
    except LeanKError as err:
        raise LeanKError(f"method {spec.label}: {err}") from None
    return MaskMethod(spec, mask)


def prepare_methods(
    specs: Sequence[MethodSpec], model, tokenizer, *, model_name: str, mask_dir: Path
) -> list[Method]:
    return [prepare_method(s, model, tokenizer, model_name=model_name, mask_dir=mask_dir) for s in specs]
