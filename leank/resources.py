"""Masks shipped inside the package (``leank/masks/``, provenance in ``leank/masks/README.md``),
and picking one for a model: by alias, hub id or directory name, else by the config's shape.

    bundled_mask_path("meta-llama/Llama-3.1-8B-Instruct")   # the authors' mask
    bundled_mask_path(model)                                # a loaded model: its name, else its shape
"""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path

from .errors import LeanKError

# model alias -> method -> {sparsity: file name}; the first entry of each is the default.
BUNDLED_MASKS: dict[str, dict[str, dict[float, str]]] = {
    "smollm2-135m": {
        # 0.7 / 0.8 learned on one H100 (benchmarks/results/train_smollm2/README.md has the command);
        # 0.85 / 0.9 on one H200 with the paper's 2000 + 200 steps, λ 0.12, align 8 (85.8% / 91.5%;
        # benchmarks/results/train_smollm2_lam12/README.md)
        "leank": {0.7: "smollm2-135m.leank-0.70.safetensors", 0.8: "smollm2-135m.leank-0.80.safetensors",
                  0.85: "smollm2-135m.leank-0.85.safetensors", 0.9: "smollm2-135m.leank-0.90.safetensors"},
        # The baseline, calibrated from activation magnitudes: `leank calibrate --model smollm2-135m
        # --sparsity 0.7 --align 16 --out leank/masks/smollm2-135m.magnitude-0.70.safetensors`
        "magnitude": {0.7: "smollm2-135m.magnitude-0.70.safetensors"},
    },
    # The paper authors' released masks (microsoft/MInference, MIT licence; leank/masks/README.md).
    # Nominal 70%: 68.75% and 70.98% of K channels pruned.
    "llama-3.1-8b-instruct": {"leank": {0.7: "llama3.1-8b-instruct.leank-mask.safetensors"}},
    "qwen2.5-7b-instruct": {"leank": {0.7: "qwen2.5-7b-instruct.leank-mask.safetensors"}},
}
# alias -> names the model goes by (hub ids; matched on the last path component, any case), and
# the random-weight shape of leank.models.SHAPES that stands for it in speed and memory runs
MODEL_NAMES: dict[str, tuple[str, ...]] = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M"),
    "llama-3.1-8b-instruct": ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B-Instruct",
                              "llama3.1-8b-shape"),
    "qwen2.5-7b-instruct": ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b-shape"),
}
# alias -> the config shape its masks were made for:
# (model_type, layers, kv_heads, head_dim, hidden_size, vocab_size)
MODEL_SHAPES: dict[str, tuple] = {
    "smollm2-135m": ("llama", 30, 3, 64, 576, 49152),
    "llama-3.1-8b-instruct": ("llama", 32, 8, 128, 4096, 128256),
    "qwen2.5-7b-instruct": ("qwen2", 28, 4, 128, 3584, 152064),
}


def _name_key(name: str) -> str:
    return Path(str(name).rstrip("/\\")).name.removesuffix(".gguf").lower()


def _by_name(name: str) -> str | None:
    key = _name_key(name)
    for alias, names in MODEL_NAMES.items():
        if key == alias or key in {_name_key(n) for n in names}:
            return alias
    return None


def _shape(config) -> tuple:
    from .architectures import kv_heads_and_dim, text_config

    c = text_config(config)
    return (c.model_type, c.num_hidden_layers, *kv_heads_and_dim(c), c.hidden_size, c.vocab_size)


def bundled_model(model) -> str:
    """The bundled alias for ``model``: an alias, a hub id or a path (its last component; a model
    directory's ``config.json`` is read when the name does not match), a transformers config or a
    model (its ``_name_or_path``, else its shape). A ``LeanKError`` when no bundled mask fits."""
    config = getattr(model, "config", model) if not isinstance(model, str) else None
    if isinstance(model, str):
        alias = _by_name(model)
        if alias:
            return alias
        if (Path(model).expanduser() / "config.json").is_file():
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(Path(model).expanduser())
    elif config is not None and getattr(config, "_name_or_path", None):
        alias = _by_name(config._name_or_path)
        if alias:
            return alias
    what = model if isinstance(model, str) else getattr(config, "_name_or_path", None) or type(model).__name__
    if config is not None and hasattr(config, "num_hidden_layers"):
        shape = _shape(config)
        for alias, known in MODEL_SHAPES.items():
            if shape == known:
                warnings.warn(f"no bundled mask is named for {what!r}: using the {alias} mask, made for a model of "
                              "the same shape (untested on other weights); pass a mask file to choose",
                              stacklevel=2)
                return alias
    known = ", ".join(f"{alias} ({MODEL_NAMES[alias][0]})" for alias in BUNDLED_MASKS)
    raise LeanKError(f"no bundled mask for {what!r}: bundled masks exist for {known}; pass a mask file "
                     "(--mask), or make one with `leank train` or `leank calibrate`")


def bundled_mask_path(model="smollm2-135m", sparsity: float | None = None, *, method: str = "leank") -> Path:
    """Path of a mask shipped with LeanK for ``model`` (see :func:`bundled_model`; default: the
    bundled SmolLM2 mask), at ``sparsity`` (default: the model's first, 0.7) made by ``method``."""
    alias = bundled_model(model)
    methods = BUNDLED_MASKS[alias]
    table = methods.get(method)
    if not table:
        raise LeanKError(f"no bundled {method!r} mask for {alias}: available methods {', '.join(methods)}")
    if sparsity is None:
        sparsity = next(iter(table))
    if sparsity not in table:
        raise LeanKError(f"no bundled {alias} {method} mask at sparsity {sparsity}: available {sorted(table)}")
    return Path(str(resources.files("leank") / "masks" / table[sparsity]))
