#!/usr/bin/env bash
# On a lent GPU machine (no package registry there): assemble the SmolLM2 GGUF from its carried
# parts, install the carried `gguf` wheel, and export what LeanK needs.
# A call carries at most 64 MiB with the repository, so the GGUF travels in parts (`split -d`):
# earlier calls copy theirs to ~/m (`cp .carry1/part00 ~/m/`, ...), the last carries its own in
# .carry2 with .whl and runs: source scripts/gpu_setup.sh
set -e
mkdir -p ~/m ~/cache
if [ ! -f ~/m/smollm2.gguf ]; then
  cat ~/m/part[0-9][0-9] .carry2/part[0-9][0-9] > ~/m/smollm2.gguf
fi
echo "$(sha256sum ~/m/smollm2.gguf)"
python3 -m pip install -q --no-index --no-deps --target ~/site .whl/*.whl 2>/dev/null || true
export PYTHONPATH=~/site:$PWD
export LEANK_SMOLLM2_GGUF=~/m/smollm2.gguf LEANK_CACHE=~/cache PYTHONUNBUFFERED=1
set +e
