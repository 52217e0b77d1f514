#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# On the GPU machine: join the SmolLM2 GGUF parts shipped to /tmp/mkv/model (see bench/RESULTS.md) and convert
# them once to a safetensors checkpoint under $MOSAICKV_CACHE; prints the checkpoint directory.
set -euo pipefail
export MOSAICKV_CACHE="${MOSAICKV_CACHE:-/tmp/mkv/cache}"
gguf="$MOSAICKV_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
  mkdir -p "$(dirname "$gguf")"
  cat /tmp/mkv/model/gguf.part.* > "$gguf.part" && mv "$gguf.part" "$gguf"
fi
python3 -c "from bench.smollm2 import ensure_converted; print(ensure_converted())" | tail -1
