#!/usr/bin/env bash
# On a lent GPU machine (no package registry there): assemble the SmolLM2 GGUF from the two
# carried halves, install the carried `gguf` wheel, and export what LeanK needs.
# Usage (second call on a warm machine, carrying .carry2 and .whl): source scripts/gpu_setup.sh
set -e
mkdir -p ~/m ~/cache
if [ ! -f ~/m/smollm2.gguf ]; then
  cat ~/m/part00 .carry2/part01 > ~/m/smollm2.gguf
fi
echo "$(sha256sum ~/m/smollm2.gguf)"
python3 -m pip install -q --no-index --no-deps --target ~/site .whl/*.whl 2>/dev/null || true
export PYTHONPATH=~/site:$PWD
export LEANK_SMOLLM2_GGUF=~/m/smollm2.gguf LEANK_CACHE=~/cache PYTHONUNBUFFERED=1
set +e
