"""Masks shipped inside the package (``leank/masks/``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import LeanKError

# model alias -> {sparsity: file name}; the first entry is the default.
BUNDLED_MASKS: dict[str, dict[float, str]] = {
    # Calibrated from activation magnitudes (not learned): `leank calibrate --model smollm2-135m
    # --sparsity 0.7 --align 16 --out leank/masks/smollm2-135m.magnitude-0.70.safetensors`
    "smollm2-135m": {0.7: "smollm2-135m.magnitude-0.70.safetensors"},
}


def bundled_mask_path(model: str = "smollm2-135m", sparsity: float | None = None) -> Path:
    """Path of a mask shipped with LeanK for ``model`` (default sparsity: the first listed)."""
    table = BUNDLED_MASKS.get(model)
    if not table:
        raise LeanKError(f"no bundled mask for {model!r}: bundled masks exist for {', '.join(BUNDLED_MASKS) or 'none'}")
    if sparsity is None:
        sparsity = next(iter(table))
    if sparsity not in table:
        raise LeanKError(f"no bundled {model} mask at sparsity {sparsity}: available {sorted(table)}")
    return Path(str(resources.files("leank") / "masks" / table[sparsity]))
