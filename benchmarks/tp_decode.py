"""LeanK decoding under tensor parallelism (issue 16): ``leank.bench_tp`` with its own options
(``--points BATCHxPROMPT``); ``leank bench --tensor-parallel`` / ``torchrun ... -m leank.cli bench``
runs the same measurement.

    PYTHONPATH=. python benchmarks/tp_decode.py --points 8x32768 1x131072 --out $OUT/tp1
    PYTHONPATH=. python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/tp_decode.py \\
        --points 8x32768 1x131072 --reference $OUT/tp1/tokens.json --out $OUT/tp2
"""

import sys

from leank.bench_tp import main
from leank.errors import LeanKError

if __name__ == "__main__":
    try:
        main()
    except LeanKError as e:
        sys.exit(f"tp_decode.py: error: {e}")
