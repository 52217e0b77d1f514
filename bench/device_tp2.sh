#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Tensor-parallel checks on a two-GPU machine (nvidia-h200-x2), one step per device call, results under $OUT/<step>.
# Needs the SGLang bundle sourced (device-env.sh) and, for the smollm2 steps, the GGUF parts in /tmp/mkv/model.
#
#   smollm2-a  SmolLM2 padded to 4 KV heads (bench.pad_heads): mosaic-r3 and mosaic-r1-b0 at TP1 side by side
#              (one per GPU), then mosaic-r3 at TP2
#   smollm2-b  the dense-budget oracle at TP2: mosaic-r1-b0-tp2 against stock SGLang (dense-tp2)
#   8b-tp1     Llama-3.1-8B shape, dummy weights: bench_serving against mosaic-r3 and dense at TP1, one per GPU
#   8b-tp2     the same workload against mosaic-r3-tp2 and dense-tp2
#
# Merge the SmolLM2 results afterwards with `python -m bench.serve_check --merge DIR... --out DIR`.
set -euo pipefail
step="${1:?usage: bench/device_tp2.sh smollm2-a|smollm2-b|8b-tp1|8b-tp2}"
out="${OUT:?}/$step"
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
dense_backend="${DENSE_BACKEND:-triton}"

smollm2_padded() {
  local m
  m="$(bash bench/device_smollm2.sh)"
  local p=/tmp/mkv/cache/smollm2-kv4
  [ -s "$p/config.json" ] || python3 -m bench.pad_heads --src "$m" --out "$p" --kv-heads 4 >/dev/null
  echo "$p"
}

serve_args="--dtype bfloat16 --disable-prefill-cuda-graph --disable-decode-cuda-graph --mem-fraction-static 0.5"
serve_check() {  # serve_check <out subdir> <port> <configs...>
  local sub="$1" port="$2"; shift 2
  python3 -m bench.serve_check --model "$P" --configs "$@" --lengths 2048 7680 --samples 2 --max-tokens 16 \
    --port "$port" --ready-timeout 300 --dense-backend "$dense_backend" --server-args "$serve_args" \
    --out "$out/$sub" > "$out/$sub.log" 2>&1
}

tput_server_args="--load-format dummy --mem-fraction-static 0.8 --disable-prefill-cuda-graph --disable-decode-cuda-graph --context-length 16384"
tput_bench_args="--dataset-name random-ids --num-prompts 32 --random-input-len 8000 --random-output-len 256 --random-range-ratio 1.0"
throughput() {  # throughput <out subdir> <port> <configs...>
  local sub="$1" port="$2"; shift 2
  python3 -m bench.serving_throughput --model "$MKV_MODELS/llama-3.1-8b-shape" --configs "$@" --port "$port" \
    --dense-backend flashinfer --server-args "$tput_server_args" --bench-args "$tput_bench_args" \
    --ready-timeout 300 --bench-timeout 240 --out "$out/$sub" > "$out/$sub.log" 2>&1
}

case "$step" in
  smollm2-a)
    P="$(smollm2_padded)"
    CUDA_VISIBLE_DEVICES=0 serve_check gpu0 30000 mosaic-r3 &
    CUDA_VISIBLE_DEVICES=1 serve_check gpu1 30001 mosaic-r1-b0 &
    wait
    serve_check tp2 30000 mosaic-r3-tp2
    ;;
  smollm2-a-tp2)  # the TP2 half of smollm2-a alone
    P="$(smollm2_padded)"
    serve_check tp2 30000 mosaic-r3-tp2
    ;;
  smollm2-b)
    P="$(smollm2_padded)"
    serve_check tp2 30000 mosaic-r1-b0-tp2 dense-tp2
    ;;
  8b-tp1)
    CUDA_VISIBLE_DEVICES=0 throughput gpu0 30000 mosaic-r3 &
    CUDA_VISIBLE_DEVICES=1 throughput gpu1 30001 dense &
    wait
    ;;
  8b-tp2)
    throughput tp2 30000 mosaic-r3-tp2 dense-tp2
    ;;
  *)
    echo "unknown step $step" >&2
    exit 2
    ;;
esac
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpus.csv" || true
