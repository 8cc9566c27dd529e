"""Compile (not run) the LeanK decode kernel for an sm_90 GPU on a CPU-only machine.

Triton's interpreter (the CPU tests) runs kernels as Python: it accepts code that the GPU
compiler refuses — e.g. a ``tl.dot`` on 8-bit operands with K < 32 in a branch the interpreter
never takes. This compiles the kernel with the exact arguments ``decode_attention_triton``
passes and the specialisations Triton's launcher makes of them, for the cases given on the
command line (``QBITS:DTYPE[:LAYER]``, e.g. ``4:bfloat16:odd``), and prints one line per case
with the decode kernel's global loads by width (PTX: are they vectorised?). Run without
``TRITON_INTERPRET`` (see tests/test_kernel.py):

    python -m tests.sm90_compile 0:bfloat16 8:bfloat16 4:bfloat16
"""

from __future__ import annotations

import collections
import re
import sys

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

import leank.kernels.triton_decode as td
import leank.kernels.triton_store as ts
from leank.quant import KVQuant
from tests.test_kernel import History, random_kept

SM90 = GPUTarget("cuda", 90, 32)
SASS = False  # --sass: also print the decode kernel's SASS opcode census
LAYERS = {  # name -> (head_dim, kept channels per KV head, prompt, max_length): the layers cases compile for
    "llama": (128, [32, 0, 128, 16], 83, None),  # counts multiples of 16: the alignment hints apply
    "odd": (96, [7, 0, 95, 33], 83, None),  # head_dim 96 (padded lanes), odd counts: no hints
    "empty": (128, [0, 0, 0, 0], 83, None),  # no middle at all: the middle store's row stride is 1
    "tiny": (64, [2, 0, 0, 0], 10, 19),  # one slot of one code byte (int4): stride 1 again
}


def specialize(jit, args: tuple, kw: dict) -> tuple[dict, dict, dict]:
    """(signature, constants, attributes) Triton's own launcher derives from a launch's arguments
    (``native_specialize_impl``: integers equal to 1 become constants, pointers and integers
    divisible by 16 are marked so): launches with equal results share one compiled kernel."""
    bound = dict(zip(jit.arg_names[: len(args)], args, strict=True), **kw)
    signature, constants, attrs = {}, {}, {}
    for i, p in enumerate(jit.params):
        v = bound.get(p.name, p.default)
        if p.is_constexpr or v is None:
            signature[p.name], constants[p.name] = "constexpr", v
            continue
        kind, key = native_specialize_impl(BaseBackend, v, False, p.name not in jit.do_not_specialize, True)
        signature[p.name] = kind
        if kind == "constexpr":
            constants[p.name] = key
        elif key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def _compile_instead_of_launch(jit, ptx: dict):
    """A ``JITFunction.run`` stand-in: the launch specialised as Triton's launcher does
    (:func:`specialize`), compiled for sm_90; the PTX kept in ``ptx[kernel name]``."""
    def run(*args, grid, warmup, **kw):
        options = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
        signature, constants, attrs = specialize(jit, args, kw)
        compiled = triton.compile(ASTSource(jit, signature, constants, attrs), target=SM90, options=options)
        ptx[jit.fn.__name__] = compiled.asm["ptx"]
        ptx[jit.fn.__name__ + ".cubin"] = compiled.asm["cubin"]
        ptx[jit.fn.__name__ + ".shared"] = compiled.metadata.shared
    return run


def _tool(name: str):
    from pathlib import Path

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _on_file(tool: list[str], cubin: bytes) -> str:
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([*tool, f.name], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> str:
    """Registers per thread and static shared memory of a cubin's kernel (cuobjdump's resource usage)."""
    line = _on_file([_tool("cuobjdump"), "--dump-resource-usage"], cubin)
    return " ".join(re.findall(r"(REG:\d+|SHARED:\d+)", line))


def sass_census(cubin: bytes) -> collections.Counter:
    """Opcodes (without modifiers) of a cubin's SASS, through the nvdisasm Triton ships."""
    sass = _on_file([_tool("nvdisasm"), "-c"], cubin)
    return collections.Counter(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M))


def main(cases: list[str]) -> int:
    """Cases ``BITS[s]:DTYPE[:LAYER]`` (BITS 0 = no quantisation, groups of 32, ``s``: symmetric;
    LAYER from ``LAYERS``). The store kernel is compiled too (one decode step's cache update)."""
    td.check_query = lambda query: None  # CPU tensors: only their dtypes, strides and alignment matter here
    failed = 0
    for case in cases:
        bits, dtype, layer = (case.split(":") + ["llama"])[:3]
        D, counts, prompt, max_length = LAYERS[layer]
        symmetric = bits.endswith("s")
        bits = int(bits.removesuffix("s"))
        dtype, quant = getattr(torch, dtype), KVQuant(bits, 32, symmetric) if bits else None
        ptx = {}
        td._leank_decode_kernel.run = _compile_instead_of_launch(td._leank_decode_kernel, ptx)
        td._merge_kernel.run = _compile_instead_of_launch(td._merge_kernel, ptx)
        ts._store_step_kernel.run = _compile_instead_of_launch(ts._store_step_kernel, ptx)
        gen = torch.Generator().manual_seed(0)
        hist = History(B=1, H=4, D=D, kept=random_kept(4, D, counts, gen), dtype=dtype, gen=gen, quant=quant,
                       backend="triton", sink=2, recent=16, pads=[0], prompt=prompt, max_length=max_length)
        try:
            hist.step()  # the store kernel, compiled instead of run (the stores keep the prompt's values)
            td.decode_attention_triton(hist._rand(1, 16, 1, D), hist.layer.view, D**-0.5)
            missing = {"_store_step_kernel", "_leank_decode_kernel", "_merge_kernel"} - set(ptx)
            if missing:
                raise RuntimeError(f"not compiled: {sorted(missing)}")
            loads = collections.Counter(re.findall(r"ld\.global\.([\w.]+)", ptx["_leank_decode_kernel"]))
            print(f"{case}: compiled; decode kernel global loads by width: {dict(loads.most_common())}")
            if SASS:
                shared = ptx["_leank_decode_kernel.shared"]
                print(f"{case}: {resources(ptx['_leank_decode_kernel.cubin'])} dynamic shared {shared} B")
                print(f"{case}: SASS opcodes {dict(sass_census(ptx['_leank_decode_kernel.cubin']).most_common())}")
        except Exception as e:  # noqa: BLE001 - report the innermost compiler message
            while e.__cause__ is not None:
                e = e.__cause__
            print(f"{case}: FAILED {type(e).__name__}: {e}")
            failed += 1
    return failed


if __name__ == "__main__":
    SASS = "--sass" in sys.argv
    sys.exit(main([a for a in sys.argv[1:] if a != "--sass"]))
