"""One layer of the LeanK decode kernel, launched a few times, for a hardware-counter profiler.

Builds layer ``--layer`` of the Llama-3.1-8B shape (the authors' mask, random bf16 K/V) at ``--batch`` x
``--tokens``, plain or with a quantised middle store (``--quant int4s``), and calls the decode kernel
``--calls`` times. Run it under Nsight Compute on the GPU (Firecracker machines read the counters):

    ncu --clock-control none --kernel-name regex:_leank_decode_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \\
        --section MemoryWorkloadAnalysis python benchmarks/profile_kernel.py --quant int4s

(stall reasons per warp state say whether a kernel waits on memory, on shared memory, or issues too much).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_kernel import build_layer, model_mask  # noqa: E402

from leank.kernels import triton_decode as td  # noqa: E402
from leank.quant import parse_quant  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--layer", type=int, default=16)
    parser.add_argument("--quant", default=None, help="int8, int4, int4s, ... (default: the plain bf16 store)")
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_kernel.py needs a CUDA GPU")
    mask = model_mask("llama3.1-8b")
    if not 0 <= args.layer < mask.num_layers:
        sys.exit(f"--layer must be in [0, {mask.num_layers})")
    Hq, H, D = 32, 8, 128
    torch.manual_seed(0)
    k = torch.randn(args.batch, H, args.tokens, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(args.batch, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    quant = parse_quant(args.quant) if args.quant else None
    layer = build_layer(mask.kept[args.layer], k, v, mask.sink, mask.recent, quant)
    del k, v
    for _ in range(args.calls):
        td.decode_attention_triton(q, layer.view, D**-0.5)
    torch.cuda.synchronize()
    print(f"layer {args.layer}: kept per head {[int(c) for c in mask.kept[args.layer].sum(-1)]}, "
          f"{args.calls} calls, quant {quant.label if quant else 'none'}")


if __name__ == "__main__":
    main()
