"""End-to-end decoding benchmark (the same as ``leank bench``; see leank/bench.py).

    python benchmarks/decode_e2e.py --model llama3.1-8b-shape --lengths 32768 --batches 1 \
        --budget-gib 70 --out benchmarks/results/decode_e2e_llama8b_shape
    python benchmarks/decode_e2e.py --model smollm2-135m --lengths 8192 --batches 1 8 \
        --budget-gib 16 --out benchmarks/results/decode_e2e_smollm2
"""

import sys

from leank.cli import main

if __name__ == "__main__":
    sys.argv = ["leank", "bench", *sys.argv[1:]]  # recorded as the equivalent `leank bench` command
    sys.exit(main(sys.argv[1:]))
