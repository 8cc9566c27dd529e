"""Compile (not run) the LeanK decode kernel for an sm_90 GPU on a CPU-only machine.

Triton's interpreter (the CPU tests) runs kernels as Python: it accepts code that the GPU
compiler refuses — e.g. a ``tl.dot`` on 8-bit operands with K < 32 in a branch the interpreter
never takes. This compiles the kernel with the exact arguments ``decode_attention_triton``
passes, for the cases given on the command line (``QBITS:DTYPE``, e.g. ``4:bfloat16``), and
prints one line per case with the decode kernel's global loads by width (PTX), which shows
whether the loads are vectorised (pointers and integers divisible by 16 are specialised as
Triton's launcher does). Run without ``TRITON_INTERPRET`` (see tests/test_kernel.py):

    python -m tests.sm90_compile 0:bfloat16 8:bfloat16 4:bfloat16
"""

from __future__ import annotations

import collections
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import leank.kernels.triton_decode as td
from leank.quant import KVQuant
from tests.test_kernel import History, random_kept

SM90 = GPUTarget("cuda", 90, 32)
CODES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8"}


def _compile_instead_of_launch(jit, ptx: dict):
    """A ``JITFunction.run`` stand-in: the launch's signature, constants and divisibility
    specialisations, compiled for sm_90; the PTX kept in ``ptx[kernel name]``."""
    def run(*args, grid, warmup, **kw):
        options = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
        bound = dict(zip(jit.arg_names[: len(args)], args, strict=True), **kw)
        signature, constants, attrs = {}, {}, {}
        for i, p in enumerate(jit.params):
            v = bound.get(p.name, p.default)
            if not p.is_constexpr and p.name not in jit.do_not_specialize and (
                    (isinstance(v, torch.Tensor) and v.data_ptr() % 16 == 0) or (type(v) is int and v % 16 == 0)):
                attrs[(i,)] = [["tt.divisibility", 16]]
            if p.is_constexpr or v is None:
                signature[p.name], constants[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                signature[p.name] = "*" + CODES[v.dtype]
            elif isinstance(v, int):
                signature[p.name] = "i64" if abs(v) >= 2**31 else "i32"
            else:
                signature[p.name] = "fp32"
        compiled = triton.compile(ASTSource(jit, signature, constants, attrs), target=SM90, options=options)
        ptx[jit.fn.__name__] = compiled.asm["ptx"]
    return run


def main(cases: list[str]) -> int:
    td.check_query = lambda query: None  # CPU tensors: only their dtypes and strides matter here
    ptx = {}
    td._leank_decode_kernel.run = _compile_instead_of_launch(td._leank_decode_kernel, ptx)
    td._merge_kernel.run = _compile_instead_of_launch(td._merge_kernel, ptx)
    failed = 0
    for case in cases:
        bits, dtype = case.split(":")
        dtype, quant = getattr(torch, dtype), KVQuant(int(bits), 32) if int(bits) else None
        gen = torch.Generator().manual_seed(0)
        hist = History(B=1, H=4, D=128, kept=random_kept(4, 128, [32, 0, 128, 16], gen), dtype=dtype, gen=gen,
                       quant=quant, backend="torch", sink=2, recent=16, pads=[0], prompt=83)
        hist.step()
        try:
            td.decode_attention_triton(hist._rand(1, 16, 1, 128), hist.layer.view, 128**-0.5)
            loads = collections.Counter(re.findall(r"ld\.global\.([\w.]+)", ptx["_leank_decode_kernel"]))
            print(f"{case}: compiled; decode kernel global loads by width: {dict(loads.most_common())}")
        except Exception as e:  # noqa: BLE001 - report the innermost compiler message
            while e.__cause__ is not None:
                e = e.__cause__
            print(f"{case}: FAILED {type(e).__name__}: {e}")
            failed += 1
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
