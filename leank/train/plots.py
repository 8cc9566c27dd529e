"""PNG plots of a training run: loss curves and α per layer × head × channel."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .._io import atomic_write


def plot_run(out: str | Path, alpha: torch.Tensor | None = None) -> list[Path]:
    """Write ``loss.png`` (from ``out/log.jsonl``) and, given the run's α ``[L, H, D]``,
    ``alpha.png`` into ``out``; returns the paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = Path(out)
    written = []
    log = out / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line] if log.is_file() else []
    stages = sorted({r["stage"] for r in records}, key=lambda s: (s != "stage1", s))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for stage in stages:
        rows = [r for r in records if r["stage"] == stage]
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["distill"] for r in rows], label=stage, lw=0.8)
        axes[1].plot(steps, [r["reg"] for r in rows], label=stage, lw=0.8)
        axes[2].plot(steps, [r["sparsity"] for r in rows], label=stage, lw=0.8)
    for ax, title in zip(
        axes,
        ["distillation loss (relative MSE)", "regularisation λ·mean α", "sparsity (stage 1: α < 0.5)"],
        strict=True,
    ):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.tight_layout()
    path = out / "loss.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    written.append(path)

    if alpha is not None:
        alpha = alpha.detach().float().cpu()
        L, H, D = alpha.shape
        fig, ax = plt.subplots(figsize=(8, max(4, L * H / 12)))
        im = ax.imshow(
            alpha.reshape(L * H, D).numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
        )
        ax.set_xlabel("channel (c and c + D/2 form a RoPE pair)")
        ax.set_ylabel("layer × KV head")
        ax.set_yticks([i * H for i in range(0, L, max(1, L // 10))])
        ax.set_yticklabels([str(i) for i in range(0, L, max(1, L // 10))])
        ax.set_title("stage-1 α")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = out / "alpha.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
        written.append(path)
    return written
