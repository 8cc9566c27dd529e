"""Versions and hardware recorded next to every benchmark figure."""

from __future__ import annotations

import platform
import sys

import torch
import transformers


def environment() -> dict:
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "command": " ".join(["python"] + sys.argv),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    return env
