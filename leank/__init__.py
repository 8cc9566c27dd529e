"""LeanK: learned static K-cache channel pruning for long-context decoding.

    import leank
    model, tok = leank.load_model("smollm2-135m")          # LeanK attention enabled
    mask = leank.ChannelMask.load(leank.bundled_mask_path("smollm2-135m"))
    cache = leank.LeanKCache(model, mask, max_length=4096)   # static: generate() compiles it on CUDA
    leank.fuse_projections(model)                            # optional: q/k/v and gate/up as one GEMM each
    out = model.generate(**tok(prompt, return_tensors="pt"), **leank.cache_kwargs(cache))

The training code (``leank.train``) is not imported here.
"""

from .attention import enable
from .cache import LeanKCache, LeanKLayer, cache_kwargs
from .contract import DecodeView, in_full
from .errors import LeanKError
from .fuse import fuse_projections, unfuse_projections
from .kernels import decode_attention
from .masks import ChannelMask, binarize
from .models import load_model, load_tokenizer
from .quant import KVQuant
from .resources import bundled_mask_path

__all__ = [
    "ChannelMask",
    "DecodeView",
    "KVQuant",
    "LeanKCache",
    "LeanKError",
    "LeanKLayer",
    "binarize",
    "bundled_mask_path",
    "cache_kwargs",
    "decode_attention",
    "enable",
    "fuse_projections",
    "in_full",
    "load_model",
    "load_tokenizer",
    "unfuse_projections",
]
__version__ = "0.1.0"
