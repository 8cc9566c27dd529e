"""Versions and hardware recorded next to every benchmark figure."""

from __future__ import annotations

import os
import platform
import sys

import torch


def environment(command: str | None = None) -> dict:
    import transformers

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "command": command or " ".join(["python"] + sys.argv),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env
