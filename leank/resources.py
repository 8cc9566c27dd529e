"""Masks shipped inside the package (``leank/masks/``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import LeanKError

# model alias -> method -> {sparsity: file name}; the first entry of each is the default.
BUNDLED_MASKS: dict[str, dict[str, dict[float, str]]] = {
    "smollm2-135m": {
        # Learned on one H100 (benchmarks/results/train_smollm2/README.md has the command).
        "leank": {0.7: "smollm2-135m.leank-0.70.safetensors", 0.8: "smollm2-135m.leank-0.80.safetensors"},
        # The baseline, calibrated from activation magnitudes: `leank calibrate --model smollm2-135m
        # --sparsity 0.7 --align 16 --out leank/masks/smollm2-135m.magnitude-0.70.safetensors`
        "magnitude": {0.7: "smollm2-135m.magnitude-0.70.safetensors"},
    },
}


def bundled_mask_path(model: str = "smollm2-135m", sparsity: float | None = None, *, method: str = "leank") -> Path:
    """Path of a mask shipped with LeanK for ``model`` (default: the learned 70% mask)."""
    methods = BUNDLED_MASKS.get(model)
    if not methods:
        raise LeanKError(f"no bundled mask for {model!r}: bundled masks exist for {', '.join(BUNDLED_MASKS) or 'none'}")
    table = methods.get(method)
    if not table:
        raise LeanKError(f"no bundled {method!r} mask for {model}: available methods {', '.join(methods)}")
    if sparsity is None:
        sparsity = next(iter(table))
    if sparsity not in table:
        raise LeanKError(f"no bundled {model} {method} mask at sparsity {sparsity}: available {sorted(table)}")
    return Path(str(resources.files("leank") / "masks" / table[sparsity]))
