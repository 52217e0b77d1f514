#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Served runs on one GPU (nvidia-h200), one step per device call, results in $OUT/<step>.tgz.
# Needs the SGLang bundle sourced (device-env.sh); the smollm2 step also the GGUF parts in /tmp/mkv/model and the
# extracted essays in /tmp/mkv/cache/essays (bench.essays' cache layout).
#
#   smollm2  SmolLM2-135M-Instruct, stock SGLang (triton backend) and --kv-compressor mosaic (ratio $RATIO, default 4,
#            sidecar on) side by side on one GPU, both with --chunked-prefill-size 2048 and --enable-metrics:
#            accuracy suite, essay agreement and the bad-request cases on both; on mosaic also /metrics and, unless
#            SOAK=0, the soak (1,000 requests, sidecar killed every 30 s, /flush_cache during load, a disconnect
#            mid-prefill)
#   axes     SmolLM2, issue #6's accuracy at equal bytes: stock SGLang (triton); with FP8=1 stock with --kv-cache-dtype
#            fp8_e4m3 (triton); mosaic at each of $RATIOS (default $RATIO); --mosaic-axes token and channel (the served
#            single-axis baselines) at each of $AXES_RATIOS (default $RATIO); the accuracy suite at 2k, 4k, 6k and 8k
#            ($SAMPLES samples a length, default 4) on all at once
#   8b       Llama-3.1-8B shape, dummy weights, --mem-fraction-static 0.4: sglang.bench_serving (32 x 8000 in /
#            256 out, rate inf) against mosaic at $RATIO (default 4, sidecar on), then stock SGLang (flashinfer), one
#            server at a time; after mosaic's bench (and stock's with PROFILE_STOCK=1), 1 prefill and 3 decode steps
#            under torch's profiler, GPU kernels only (bench.profile_summary: GPU busy vs span, per kernel). The
#            workload and memory: PROMPTS, IN_LEN, OUT_LEN, MEM_FRACTION, CONTEXT_LEN, BENCH_TIMEOUT (seconds a bench);
#            e.g. PROMPTS=16 IN_LEN=32000 OUT_LEN=2000 MEM_FRACTION=0.2 CONTEXT_LEN=34100 BENCH_TIMEOUT=260: issue #4's
#            long-context workload scaled to the KV memory left by --mem-fraction-static (each server sizes its own
#            pool in that memory: the capacity-bound regime). FP8=1 adds stock with --kv-cache-dtype fp8_e4m3 last;
#            MOSAIC=0 skips mosaic (stock and fp8 in a call of their own when the workload is too long for one)
#   sidecar  SmolLM2, three mosaic-r3 servers (sidecar off / on without re-segmentation / on): shared-context accuracy,
#            decode ITL under a shared-prefix load with the sidecar off and busy, sidecar CPU time (issue #5); the
#            bad-request cases against the sidecar-on server (issue #8)
#   kernels  no server: the gpu-marked tests (kernels, startup choices, the backend's graph and overlap-plan tests),
#            the arena compaction tests on CUDA, bench.sidecar_cost (the bridge's
#            time per seal and tick, profiled), bench.seal_cost for 128 pages of the 8B shape (the rank kernel's chan
#            drop, with its profile); while $BUDGET_S lasts, the other chan drop methods, 8 pages, bench.chan_rank
#            (the rank kernel against torch's top-k) and tests/kernels compiled for the GPU
#   seal-graphs  no server: the seal graphs' GPU tests (captured once a bucket, replays plan as the one-call planner;
#            the pending seal's planner beside the step, plain and through graphs), then bench.seal_cost of
#            the 8B shape at 128 and 100 pages with --graph-pages 64,128,160 (the host time of a seal through its
#            bucket's graph beside the one-call planner's, in the same run, plans compared), then bench.pack_cost of
#            the 8B shape at 32 and 128 pages (the pack's host time, profiled; the pack kernel alone, one launch per
#            layer against one for all, bytes compared)
#   overlap  SmolLM2, --mosaic-overlap-schedule on: bench.serve_check of stock SGLang (triton), stock with FlashInfer
#            (stock against stock: the kernels' rounding noise), ratio 1 with the overlap scheduler on (token for token
#            against stock), ratio 4 with it on
#   select   no server: the selection's and the pending seal's GPU tests, then bench.decode_speed (8B shape, 4,608
#            and 32,768 tokens, batch 16, CUDA graphs): the selection alone against the one it replaced, side by side
#   bracket  no server: the Lagrangian kernels' tests on the GPU (the choice's start, bracket search and fix-up
#            against the torch path, bit for bit, and captured in a graph), then bench.seal_cost --also-lagrange-bracket
#            kernel of the 8B shape's planner slices (4 and 8 layers of 16 pages) and a whole 128-page seal, eager and
#            through seal graphs: time, graph memory, kernel ops and Triton launches of each bracket, plans compared
#   slice-profile  no server: the 8B shape's planner slices (SLICE_SHAPES, LAYERSxPAGES each, default "4x16 8x16":
#            4 and 8 of 32 layers, 16 pages) as served seals plan them (the Triton chan drop and estimate-terms
#            kernels, which every server's startup choice has picked), eager and through their seal graph (of the
#            slice's page count), one graph replay profiled: bench.profile_summary's kernels busy against their span
#            and the top kernels; beside them the same slices with the bracket search's kernel
#            (MOSAICKV_LAGRANGE_BRACKET=kernel), eager and graphed, its replay profiled too (graphed_bracket_trace in
#            the same summary). SLICE_COMPILE="lagrange planner" (either or
#            both): each shape again with MOSAICKV_COMPILE_LAGRANGE=1, then MOSAICKV_COMPILE_PLANNER=1 (files named
#            ...-lagrange, ...-planner, without the bracket kernel; the first call compiles, not timed; each run's
#            whole time is in its slice-cost file)
#   tune     no server: bench.decode_speed --tune (launch and chan-rebuild modes, 8B shape, 8k and 128k, batch 16
#            and 32)
#   ncu      no server: Nsight Compute's counters of the sparse decode, segment scores and FlashInfer decode kernels
#            (8B shape, batch 32, 8k and 128k), as text
#   tpot     Llama-3.1-8B shape, one configuration ($CONFIG, default mosaic-r4) per call: served TPOT at 32k and 130k
#            prompts, batch 1 and 16 (bench.serving_throughput --context-lengths)
#   sweep    SmolLM2, stock SGLang (triton) then mosaic-r3, both with decode CUDA graphs: bench.serving_throughput
#            over concurrency 1 / 8 / 32 on random ids and shared prefixes (WORKLOAD=random|shared: one of them a
#            call; TPOT over context: bench.decode_speed)
#   soak     SmolLM2, mosaic-r3 alone with --max-total-tokens 150000 and --schedule-conservativeness 0.3: the soak with
#            every fault, the server started by bench.soak and restarted with the same flags at the end; the Triton
#            kernel variants compiled before and after (recompiles mid-serving show up there). Sizing: the arena ledger
#            reserves each sealed page's byte budget at the target ratio, and the cap sizes the arena for that many
#            tokens at that ratio, so arena and logical slots fill together (the dense hot pool's share of the slots
#            aside). With outputs of 8-128 tokens the 150k run filled 99% of the slots and 72% of the arena without a
#            retraction: the requests admitted never outgrew their reservation. Outputs of 16-512 tokens grow past it,
#            so SGLang must retract while the slots and the arena are full
#
# Run a step under `timeout -s TERM N` a little under the device call's limit: on TERM the step stops and its results
# are still packed. The JIT caches of FlashInfer (~/.cache/flashinfer: minutes of nvcc on a fresh machine, 75 s for
# its sampling module alone) and of SGLang's JIT kernels (~/.cache/tvm-ffi: about 10 s of nvcc per kernel, norm,
# rope, kvcache, activation...) come back as $OUT/jit-flashinfer.tgz and $OUT/jit-tvm-ffi.tgz, one archive per
# cache, each at most 16 MiB (the device tool's limit per file: one archive of both went over it in the twelfth run);
# sent back as .device-jit/ (copied to /tmp/mkv/jit in a call of its own), every archive is restored before the next
# step starts.
set -euo pipefail
step="${1:?usage: bench/device_served.sh smollm2|axes|8b|soak|sweep|tpot|overlap|sidecar|sidecar-itl|kernels|seal-graphs|bracket|slice-profile|tune|ncu}"
ratio="${RATIO:-4}"  # smollm2 and 8b: the mosaic server's --mosaic-compression-ratio
out="${OUT:?}/$step"
mkdir -p "$out"
export MOSAICKV_CACHE=/tmp/mkv/cache
# the servers' status lines (slowest decode plans, gc pauses) every 5 s: the loads last seconds, not minutes
export MOSAICKV_STATUS_INTERVAL="${MOSAICKV_STATUS_INTERVAL:-5}"
# the sparse decode variant fixed, not timed: servers started side by side time it beside each other's start-up and
# chose a variant that served 15% slower (thirty-fourth run); popcount without a cap is the H100's quiet choice for
# the 8B shape. MOSAICKV_DECODE_TUNE=1 times it again (the tune and select steps time the variants themselves).
export MOSAICKV_DECODE_TUNE="${MOSAICKV_DECODE_TUNE:-popcount}"
t_start=$SECONDS
pack_results() {  # on exit, also a failed one: the device tool brings back a limited number of files, so one archive
  # files that first-use compilers wrote during the step outside Triton's cache (FlashInfer's JIT, the CUDA driver's
  # PTX JIT, SGLang's JIT kernels, TorchInductor), with write times: a stall at the first large batch shows up here
  find "${HOME}/.cache" "${HOME}/.nv" /tmp/torchinductor_* -type f -newer "$start_marker" ! -path "$out/*" \
    -printf '%TT %s %p\n' 2>/dev/null | sort > "$out/jit-caches.txt" || true
  # the stack samplers' raw files (every stack since a server started) stay behind; their loads' share is gzipped
  find "$out" -maxdepth 1 -name 'stacks-*' ! -name '*.load.gz' -delete 2>/dev/null || true
  tar czf "$OUT/$step.tgz" -C "$OUT" "$step" && rm -rf "$out" && echo "results in $OUT/$step.tgz"
  # each cache only when the step compiled something in it (a restored, unchanged cache is already where it came from)
  local c
  for c in flashinfer tvm-ffi; do
    [ -d "$HOME/.cache/$c" ] || continue
    [ -n "$(find "$HOME/.cache/$c" -type f -newer "$start_marker" ! -name '*.lock' -print -quit 2>/dev/null)" ] \
      || continue
    tar czf "$OUT/jit-$c.tgz" -C "$HOME/.cache" "$c"
    if [ "$(stat -c %s "$OUT/jit-$c.tgz")" -gt $((16 << 20)) ]; then
      echo "JIT cache $c: $(du -sh "$OUT/jit-$c.tgz" | cut -f1) compressed, too large to bring back"
      rm -f "$OUT/jit-$c.tgz"
    fi
  done
}
# FlashInfer's JIT modules are rebuilt by ninja when an input is newer than the time its build log recorded. The
# bundle's sources carry the time of the CPU machine's install (each session's), so a module built before it was
# rebuilt: the tenth run's sampling module, 93 s. Giving FlashInfer's package files one fixed old time keeps every
# restored module valid. The cache keeps its archived times: restored with the extraction time (tar -m, the
# eleventh run) the outputs were newer than ninja's deps log recorded and every restored module was rebuilt.
fi_site="$(python3 -c 'import importlib.util as u, os; print(os.path.dirname(u.find_spec("flashinfer").origin))' \
  2>/dev/null || true)"
[ -z "$fi_site" ] || find "$fi_site" -exec touch -h -d '2026-01-01 00:00:00' {} + 2>/dev/null || true
restored=0
# the caches travel in a device call of their own (bench/device_prepare.sh: the tracked tree, .device-bundle/p02 and
# .device-jit together went over one transfer's 64 MiB in the twenty-second run) into /tmp/mkv/jit, or in the tree
for archive in .device-jit/*.tgz /tmp/mkv/jit/*.tgz; do
  [ -f "$archive" ] || continue
  mkdir -p "$HOME/.cache" && tar xzf "$archive" -C "$HOME/.cache" && restored=1
done
[ "$restored" = 0 ] || echo "restored the JIT caches ($(find "$HOME/.cache/flashinfer" "$HOME/.cache/tvm-ffi" \
  -name '*.so' 2>/dev/null | wc -l) modules)"
start_marker="$(mktemp)"
trap pack_results EXIT
trap 'echo "step $step stopped (TERM) after $((SECONDS - t_start)) s" >&2; exit 143' TERM
left() { echo $(( ${BUDGET_S:-540} - (SECONDS - t_start) )); }

server_alive() {  # server_alive <pid or ""> <what>: false, with a line, once the server's process has exited
  [ -z "$1" ] || kill -0 "$1" 2>/dev/null || { echo "$2: the server (pid $1) exited" >&2; return 1; }
}

wait_ready() {  # wait_ready <port> <timeout s> [pid]: with a pid, gives up as soon as that server has exited
  local port="$1" deadline=$((SECONDS + $2))
  while [ $SECONDS -lt $deadline ]; do
    server_alive "${3:-}" "port $port" || return 1
    if curl -sf "http://127.0.0.1:$port/health" >/dev/null && curl -sf -m 120 "http://127.0.0.1:$port/generate" \
        -H 'Content-Type: application/json' -d '{"text":"Hello","sampling_params":{"max_new_tokens":2}}' >/dev/null; then
      echo "port $port ready after $((SECONDS - t_start)) s"
      return 0
    fi
    sleep 2
  done
  echo "port $port not ready" >&2
  return 1
}

triton_kernels() {  # compiled Triton kernel variants in the cache, by kernel name, then each with its write time
  local dir="${TRITON_CACHE_DIR:-$HOME/.triton/cache}"
  find "$dir" -name "*.json" ! -name "__grp__*" 2>/dev/null | xargs -r -n1 basename | sort | uniq -c | sort -rn || true
  find "$dir" -name "*.json" ! -name "__grp__*" -printf '%TT %f\n' 2>/dev/null | sort || true
}

wait_log() {  # wait_log <file> <pattern> <timeout s> [pid]: until a server log shows a line (e.g. its KV pool
  # allocated); with a pid, gives up as soon as that server has exited
  local deadline=$((SECONDS + $3))
  until grep -q "$2" "$1" 2>/dev/null; do
    server_alive "${4:-}" "$1" || return 1
    [ $SECONDS -lt $deadline ] || { echo "no '$2' in $1" >&2; return 1; }
    sleep 1
  done
}

start_profile() {  # start_profile <port> <dir> <steps>: SGLang's torch profiler, GPU kernels only, next <steps> steps
  # (with CPU activities 2 prefill steps of the 8B shape made a trace of over 64 MB that took more than 90 s to write)
  curl -s -m 120 "http://127.0.0.1:$1/start_profile" -H 'Content-Type: application/json' \
    -d "{\"output_dir\": \"$2\", \"num_steps\": $3, \"activities\": [\"GPU\"]}" || true
  echo
}

wait_trace() {  # wait_trace <dir>: until SGLang has written the profile's trace (at most 90 s)
  local deadline=$((SECONDS + 90))
  until compgen -G "$1/*.trace.json.gz" > /dev/null; do [ $SECONDS -lt $deadline ] || return 1; sleep 1; done
  local size=-1
  until [ "$size" = "$(du -sb "$1" | cut -f1)" ]; do size=$(du -sb "$1" | cut -f1); sleep 1; done  # written out
}

summarize_profile() {  # summarize_profile <dir> <name>: GPU kernels of the trace, then drop it (too large)
  python3 -m bench.profile_summary "$1"/*.trace.json.gz --json "$out/profile-$2.json" > "$out/profile-$2.txt" 2>&1 \
    || true
  rm -rf "$1"
}

profile_steps() {  # profile_steps <port> <server log> <name>: 1 prefill and 3 decode steps under torch's profiler
  # on a separate short load after the benchmark (exporting a trace blocks the scheduler for seconds): 16 requests
  # of 8,000 tokens (another seed than the benchmark's: its prompts would be radix cache hits); the prefill profile
  # starts with the load, the decode one once the log shows a decode batch of 8 or more (the load's; the benchmark's
  # lines come before it); summaries at the end (reading a trace takes seconds)
  local port="$1" log="$2" name="$3" dir="$out/profile-$3" deadline load seen
  timeout 180 python3 -m sglang.bench_serving "${bench[@]}" --num-prompts 16 --random-output-len 256 --seed 2 \
    --port "$port" > "$out/profile-$name.load.log" 2>&1 &
  load=$!
  seen=$(wc -l < "$log")
  start_profile "$port" "$dir-prefill" 1 > "$out/profile-$name-prefill.response.txt"
  wait_trace "$dir-prefill" || echo "profile $name: no prefill trace" >&2
  deadline=$((SECONDS + 120))
  until tail -n +$((seen + 1)) "$log" | grep -qE "Decode batch, #running-req: ([89]|[1-9][0-9])"; do
    [ $SECONDS -lt $deadline ] || { echo "profile $name: no decode batch" >&2; break; }
    sleep 0.5
  done
  start_profile "$port" "$dir-decode" 3 > "$out/profile-$name-decode.response.txt"
  wait_trace "$dir-decode" || echo "profile $name: no decode trace" >&2
  wait "$load" || true
  summarize_profile "$dir-prefill" "$name-prefill"
  summarize_profile "$dir-decode" "$name-decode"
}

# HOST_SAMPLES=1 (8b, sidecar-itl): each server's scheduler stacks, every 2 ms, in $out/stacks-<name>
# (MOSAICKV_STACK_SAMPLES; the sampler rewrites the file every 5 s with the counts since startup); copies taken before
# and after a load give the load's share (stack-summary-<name>.txt, and the same under run_batch)
stacks() { [ "${HOST_SAMPLES:-0}" = 0 ] || echo "$out/stacks-$1"; }  # stacks <name>: the path, or "" (off)

stacks_mark() {  # stacks_mark <name> <tag>: a copy of the samples so far
  [ "${HOST_SAMPLES:-0}" = 0 ] || [ ! -f "$out/stacks-$1" ] || cp "$out/stacks-$1" "$out/stacks-$1.$2"
}

stacks_summary() {  # stacks_summary <name>: the functions of the samples since stacks_mark <name> before
  [ "${HOST_SAMPLES:-0}" = 0 ] && return 0
  sleep 6  # the sampler's next write
  stacks_mark "$1" after
  [ -f "$out/stacks-$1.after" ] || { echo "no stack samples from $1"; return 0; }
  local minus=()
  [ ! -f "$out/stacks-$1.before" ] || minus=(--minus "$out/stacks-$1.before")
  # the load's samples alone, gzipped (the raw files hold every stack since startup: megabytes, and the step's
  # archive must stay under the device tool's 16 MiB)
  python3 -m bench.stack_summary "$out/stacks-$1.after" ${minus[@]+"${minus[@]}"} --top 40 \
    --write "$out/stacks-$1.load" > "$out/stack-summary-$1.txt" 2>&1 || echo "stack_summary $1 rc=$?"
  python3 -m bench.stack_summary "$out/stacks-$1.after" ${minus[@]+"${minus[@]}"} --top 40 --under run_batch \
    > "$out/stack-summary-$1-run-batch.txt" 2>&1 || echo "stack_summary $1 rc=$?"
  [ ! -f "$out/stacks-$1.load" ] || gzip -9f "$out/stacks-$1.load"
  rm -f "$out/stacks-$1.before" "$out/stacks-$1.after"
}

ps_sidecars() {  # CPU time of the sidecar processes (spawned children of the schedulers)
  ps -eo pid,ppid,pcpu,cputime,etimes,args | grep -E "spawn_main|sglang::" | grep -v grep || true
}

background_work() {  # background_work <port>: the server's count of seals, plans applied and re-segmentations
  { curl -s -m 5 "http://127.0.0.1:$1/metrics" 2>/dev/null || true; } \
    | awk '/^sglang:mosaic_(seal_calls|plans_applied|resegmentations)_total/ {s += $NF} END {print s + 0}'
}

wait_quiet() {  # wait_quiet <max s> <port>...: until the servers' background_work stops changing for 3 s, so that
  # one server's idle work (its sidecar's plans applied, shared segments re-segmented) does not run on the GPU
  # beside another's measured load (thirtieth run: the idle sidecar server re-segmented 99 segments during the off
  # server's second load); prints how long it waited
  local deadline=$((SECONDS + $1)) t0=$SECONDS port before after; shift
  for port in "$@"; do
    before=$(background_work "$port")
    while [ $SECONDS -lt $deadline ]; do
      sleep 3
      after=$(background_work "$port")
      [ "$after" != "$before" ] || break
      before=$after
    done
  done
  echo "quiet after $((SECONDS - t0)) s$([ $SECONDS -lt $deadline ] || echo ' (gave up waiting)')"
}

case "$step" in
  smollm2)
    M="$(bash bench/device_smollm2.sh)"
    common=(--model-path "$M" --host 127.0.0.1 --dtype bfloat16 --disable-prefill-cuda-graph
            --disable-decode-cuda-graph --chunked-prefill-size 2048 --enable-metrics --mem-fraction-static 0.3)
    python3 -m sglang.launch_server "${common[@]}" --port 30001 --attention-backend triton \
      > "$out/dense.server.log" 2>&1 &
    dense_pid=$!
    sleep 20
    python3 -m sglang.launch_server "${common[@]}" --port 30000 --kv-compressor mosaic \
      --mosaic-compression-ratio "$ratio" > "$out/mosaic-r${ratio}.server.log" 2>&1 &
    mosaic_pid=$!
    wait_ready 30001 240
    wait_ready 30000 240
    (  # stock SGLang: the references
      python3 -m bench.accuracy --url http://127.0.0.1:30001 --label dense --lengths 2048 4096 8192 --samples 4 \
        --tokenizer "$M" --out "$out/acc-dense.json" > "$out/acc-dense.log" 2>&1
      python3 -m bench.agreement --url http://127.0.0.1:30001 --label dense --lengths 2048 4096 8000 --contexts 4 \
        --tokenizer "$M" --out "$out/agree-dense.json" > "$out/agree-dense.log" 2>&1
    ) &
    ref_pid=$!
    [ -n "${SKIP_BAD_INPUT:-}" ] || python3 -m bench.bad_input --url http://127.0.0.1:30000 --out "$out/bad-input.json" \
      > "$out/bad-input.log" 2>&1 || echo "bad_input rc=$?"
    python3 -m bench.accuracy --url http://127.0.0.1:30000 --label "mosaic-r${ratio}" --lengths 2048 4096 8192 \
      --samples 4 --tokenizer "$M" --out "$out/acc-mosaic-r${ratio}.json" > "$out/acc-mosaic-r${ratio}.log" 2>&1 \
      || echo "accuracy rc=$?"
    wait $ref_pid || echo "reference runs rc=$?"
    python3 -m bench.agreement --url http://127.0.0.1:30000 --label mosaic-r${ratio} --lengths 2048 4096 8000 \
      --contexts 4 --tokenizer "$M" --reference "$out/agree-dense.json" --out "$out/agree-mosaic-r${ratio}.json" \
      > "$out/agree-mosaic-r${ratio}.log" 2>&1 || echo "agreement rc=$?"
    curl -s http://127.0.0.1:30000/metrics > "$out/metrics-before-soak.txt" || true
    # the same bad requests against stock SGLang, last (a case that kills it is a finding about stock SGLang)
    [ -n "${SKIP_BAD_INPUT:-}" ] || python3 -m bench.bad_input --url http://127.0.0.1:30001 \
      --out "$out/bad-input-dense.json" > "$out/bad-input-dense.log" 2>&1 || echo "dense bad_input rc=$?"
    kill "$dense_pid" 2>/dev/null || true
    ps_sidecars > "$out/ps-before-soak.txt"
    soak_s=$(( $(left) - 40 ))
    [ "${SOAK:-1}" = 1 ] || soak_s=0
    echo "soak gets ${soak_s} s"
    [ "$soak_s" -lt 60 ] || timeout "$soak_s" python3 -m bench.soak --url http://127.0.0.1:30000 \
      --server-log "$out/mosaic-r${ratio}.server.log" \
      --server-pid "$mosaic_pid" --vocab-size 49152 --max-context 8192 --requests 1000 --concurrency 64 \
      --prefix-len 2048 --output-len 16 128 --alone-subset 16 --flush-during-load 3 --disconnect-long-prefill \
      --long-prefill-tokens 7000 --kill-sidecar-every 30 --out "$out/soak.json" > "$out/soak.log" 2>&1 \
      || echo "soak rc=$?"
    ps_sidecars > "$out/ps-after-soak.txt"
    curl -s http://127.0.0.1:30000/metrics > "$out/metrics-after-soak.txt" || true
    kill "$mosaic_pid" 2>/dev/null || true
    ;;
  axes)
    M="$(bash bench/device_smollm2.sh)"
    # fp8 on the triton backend like dense (SGLang's triton kernels read fp8 KV; FlashInfer's would need a JIT build)
    names=(dense); extra=("--attention-backend triton")
    if [ "${FP8:-0}" = 1 ]; then names+=(fp8); extra+=("--attention-backend triton --kv-cache-dtype fp8_e4m3"); fi
    for r in ${RATIOS:-$ratio}; do
      names+=("mosaic-r$r"); extra+=("--kv-compressor mosaic --mosaic-compression-ratio $r")
    done
    for r in ${AXES_RATIOS:-$ratio}; do
      mosaic="--kv-compressor mosaic --mosaic-compression-ratio $r"
      names+=("token-only-r$r" "channel-only-r$r"); extra+=("$mosaic --mosaic-axes token" "$mosaic --mosaic-axes channel")
    done
    # all servers at once (one after another cost ~55 s each): each pool capped at AXES_TOKENS (default 200,000) by
    # --max-total-tokens, the static fraction high enough that no server's sizing sees too little free memory
    last=$(( ${#names[@]} - 1 ))
    pids=()
    for i in $(seq 0 $last); do
      # shellcheck disable=SC2086
      python3 -m sglang.launch_server --model-path "$M" --host 127.0.0.1 --port $((30000 + i)) --dtype bfloat16 \
        --disable-prefill-cuda-graph --chunked-prefill-size 2048 --enable-metrics --mem-fraction-static 0.88 \
        --max-total-tokens "${AXES_TOKENS:-200000}" ${extra[$i]} > "$out/${names[$i]}.server.log" 2>&1 &
      pids+=($!)
    done
    for i in $(seq 0 $last); do wait_ready $((30000 + i)) 300; done
    acc=()
    for i in $(seq 0 $last); do
      timeout $(( $(left) - 20 )) python3 -m bench.accuracy --url "http://127.0.0.1:$((30000 + i))" \
        --label "${names[$i]}" --lengths 2048 4096 6144 8192 --samples "${SAMPLES:-4}" --tokenizer "$M" \
        --out "$out/acc-${names[$i]}.json" > "$out/acc-${names[$i]}.log" 2>&1 &
      acc+=($!)
    done
    for j in "${acc[@]}"; do wait "$j" || echo "accuracy rc=$?"; done
    for i in $(seq 0 $last); do
      curl -s "http://127.0.0.1:$((30000 + i))/metrics" > "$out/metrics-${names[$i]}.txt" || true
    done
    kill "${pids[@]}" 2>/dev/null || true
    ;;
  soak)
    M="$(bash bench/device_smollm2.sh)"
    triton_kernels > "$out/triton-cache-before.txt"
    # the soak starts the server itself (--launch) so that it can stop it and start it again with the same flags;
    # prompt + output up to the model's 8,192-token context (the tenth run's soak stopped at 6,144); MOSAIC_ARGS adds
    # mosaic flags (e.g. "--mosaic-overlap-schedule on")
    timeout $(( $(left) - 10 )) python3 -m bench.soak --launch "--model-path $M --host 127.0.0.1 --port 30000 \
      --dtype bfloat16 --disable-prefill-cuda-graph --enable-metrics \
      --mem-fraction-static 0.3 --max-total-tokens 150000 --schedule-conservativeness 0.3 --kv-compressor mosaic \
      --mosaic-compression-ratio 3 ${MOSAIC_ARGS:-}" \
      --ready-timeout 240 --vocab-size 49152 --max-context 8192 --requests 1000 --concurrency 192 --prefix-len 1536 \
      --output-len 16 512 --alone-subset 16 --flush-during-load 3 --disconnect-long-prefill --long-prefill-tokens 8000 \
      --disconnect-after 0.01 \
      --kill-sidecar-every 30 --send-deadline $(( $(left) - 240 )) --restart --out "$out/soak.json" \
      > "$out/soak.log" 2>&1 || echo "soak rc=$?"
    triton_kernels > "$out/triton-cache-after.txt"
    ;;
  overlap)
    # --mosaic-overlap-schedule on, on SmolLM2 with decode graphs (up to batch 32), one server at a time: ratio 1
    # (every segment dense, every segment read) against stock SGLang token for token with the overlap scheduler on
    # (the twelfth run showed it equal to off), stock with FlashInfer against stock with triton for the noise floor,
    # and ratio 4 with it on, while the call has time (the 8b step with MOSAIC_ARGS times it)
    M="$(bash bench/device_smollm2.sh)"
    timeout $(( $(left) - 10 )) python3 -m bench.serve_check --model "$M" \
      --configs dense mosaic-r1-b0-ov dense-flashinfer mosaic-r4-ov --dense-backend triton \
      --server-args "--dtype bfloat16 --mem-fraction-static 0.5 --disable-prefill-cuda-graph --cuda-graph-max-bs 32 \
      --enable-metrics" --lengths 2048 4096 8000 --samples 2 --max-tokens 32 --ready-timeout 240 --out "$out" \
      > "$out/serve-check.log" 2>&1 || echo "serve_check rc=$?"
    ;;
  sidecar|sidecar-itl)
    # issue #5: three mosaic r3 servers side by side (sidecar off / sidecar on without re-segmentation / sidecar on):
    # shared-context accuracy on all three at once, then decode ITL under a shared-prefix load on "off" and "on",
    # each measured while the other servers sit idle; sidecar CPU time from ps before and after.
    # sidecar-itl: "off", "on" and "on" with CPython's 5 ms switch interval ("on-gil5": the I/O thread's default
    # lowers it to 0.5 ms), only the ITL loads, each load ITL_OUTPUT_LEN (default 256) tokens a request (64 before the
    # eighteenth run: 278 decode steps, a p99 of three steps), ITL_ROUNDS rounds (below); about 6 minutes.
    # SGLang sizes a pool as (free memory) - (1 - fraction) * (total memory), so servers sharing a GPU start one
    # after another (each once the previous one has allocated its pool), with growing fractions (~25 GB each), and
    # the same --max-total-tokens, so that every server has the same pool (in the eighth run "on" had 1.6x the pages
    # of "off", a confounder of their step times). MOSAIC_ARGS adds flags to every server (e.g.
    # "--mosaic-overlap-schedule on": each decode plan then runs while the previous step is on the GPU).
    # ITL_MODEL=8b (sidecar-itl only): the Llama-3.1-8B shape with dummy weights instead of SmolLM2 (no model parts
    # needed; each pool capped at 200,000 tokens: about 12 GB of each server's 28 GB is left for the KV cache), and
    # --max-running-requests 16 (the load's concurrency): the hot pool is planned for 16 requests, not 64, on every
    # server (in the twenty-second run "off", with the least free memory, had its hot pool cut to a quarter of its
    # budget, 26,048 tokens against the others' 43,008: it sealed under hot-pool pressure in decode steps, 37 ms
    # plans, and its p99 was 3.2x its p50, a confounder of the comparison). That hot pool, 12,288 tokens, is too small
    # for the load's finished requests' dense last pages: in the twenty-third run every server sealed about 600 pages
    # under pressure inside decode steps (p99 3.3-4.7x the off p50 on all three). So with ITL_MODEL=8b every server
    # also seals beside the step (MOSAICKV_SEAL_BESIDE_STEP=1 unless set; it needs MOSAIC_ARGS="--mosaic-overlap-schedule
    # on"), which keeps a quarter of the hot pool free by sealing those pages there, not inside a step
    model_args=(--dtype bfloat16) max_tokens=3000000
    if [ "$step" = sidecar-itl ] && [ "${ITL_MODEL:-smollm2}" = 8b ]; then
      M="$MKV_MODELS/llama-3.1-8b-shape" max_tokens=200000
      model_args=(--load-format dummy --context-length 16384 --max-running-requests 16)
      export MOSAICKV_SEAL_BESIDE_STEP="${MOSAICKV_SEAL_BESIDE_STEP:-1}"
    else
      M="$(bash bench/device_smollm2.sh)"
    fi
    if [ "$step" = sidecar ]; then
      names=(sc0 rs0 on); extra=("--mosaic-sidecar off" "--mosaic-resegment off" ""); fractions=(0.2 0.4 0.6)
      envs=("" "" ""); itl_servers="0 2"; itl_output_len=64
    else
      names=(sc0 on on-gil5); extra=("--mosaic-sidecar off" "" ""); fractions=(0.2 0.4 0.6)
      envs=("" "" "MOSAICKV_SIDECAR_SWITCH_INTERVAL_MS=0"); itl_servers="0 1 2"; itl_output_len=${ITL_OUTPUT_LEN:-256}
      gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
      if [ "${ITL_MODEL:-smollm2}" = 8b ] && [ "${gpu_mib:-0}" -lt 100000 ]; then
        # three 8B servers of 28 GB do not fit an 80 GB H100 (the first one's fraction, 0.2, is below its weights):
        # "off" and "on" only, 28 GB each
        names=(sc0 on); extra=("--mosaic-sidecar off" ""); fractions=(0.35 0.7); envs=("" ""); itl_servers="0 1"
        echo "sidecar-itl: ${gpu_mib} MiB of GPU memory: two servers (sc0, on), fractions 0.35 and 0.7"
      fi
      if [ -n "${ITL_AB_ENV:-}${ITL_AB_ARGS:-}" ]; then
        # two sidecar-off servers side by side, the second ("sc0-ab") with ITL_AB_ENV's variables (e.g.
        # MOSAICKV_PACK_SOONER_AFTER=3) and ITL_AB_ARGS's server flags after the others (the last of a flag given
        # twice wins, e.g. --max-running-requests 24 for a larger hot pool): does the decode-step tail fall?
        names=(sc0 sc0-ab); extra=("--mosaic-sidecar off" "--mosaic-sidecar off ${ITL_AB_ARGS:-}"); fractions=(0.35 0.7)
        envs=("" "${ITL_AB_ENV:-}"); itl_servers="0 1"
        echo "sidecar-itl: sc0 against sc0-ab with ${ITL_AB_ENV:-} ${ITL_AB_ARGS:-}"
      fi
      if [ "${STOCK_ITL:-0}" = 1 ]; then
        # stock SGLang alone under the same load and flags (FlashInfer: SGLang's default on Hopper is FA3, which the
        # bundle lacks): the card's own decode tail, without MosaicKV; MOSAIC_ARGS and the sidecar do not apply
        names=(flashinfer); extra=("--attention-backend flashinfer"); fractions=(0.7); envs=(""); itl_servers="0"
      elif [ "${ITL_WITH_STOCK:-0}" = 1 ]; then
        # "off" and stock SGLang (FlashInfer, no MosaicKV flags) side by side: with STEP_TRACE=1, what the slow
        # steps of each share
        names=(sc0 flashinfer); extra=("--mosaic-sidecar off" "--attention-backend flashinfer"); fractions=(0.35 0.7)
        envs=("" ""); itl_servers="0 1"
      fi
    fi
    last=$(( ${#names[@]} - 1 ))
    pids=()
    mosaic_flags="--kv-compressor mosaic --mosaic-compression-ratio 3 ${MOSAIC_ARGS:-}"
    server_label() { case "$1" in flashinfer) echo stock ;; *) echo mosaic-r3 ;; esac; }
    for i in $(seq 0 $last); do
      flags=$mosaic_flags label=$(server_label "${names[$i]}")
      [ "$label" != stock ] || flags=""
      # STEP_TRACE=1: each server's scheduler writes a row a step (mosaickv_sglang.step_trace), read by
      # bench.step_trace after the loads
      trace=""
      [ "${STEP_TRACE:-0}" = 0 ] || trace="MOSAICKV_STEP_TRACE=$out/steptrace-${names[$i]}"
      # SYNC_AUDIT=1: each server counts its scheduler's synchronizing CUDA calls by stack (mosaickv_sglang.sync_audit)
      [ "${SYNC_AUDIT:-0}" = 0 ] || trace="$trace MOSAICKV_SYNC_AUDIT=$out/syncs-${names[$i]}"
      # shellcheck disable=SC2086
      env ${envs[$i]} ${trace} MOSAICKV_STACK_SAMPLES="$(stacks "r3-${names[$i]}")" \
        python3 -m sglang.launch_server --model-path "$M" --host 127.0.0.1 --port $((30000 + i)) "${model_args[@]}" \
        --disable-prefill-cuda-graph --mem-fraction-static "${fractions[$i]}" --max-total-tokens "$max_tokens" \
        --chunked-prefill-size 2048 --enable-cache-report --enable-metrics ${flags} ${extra[$i]} \
        > "$out/$label-${names[$i]}.server.log" 2>&1 &
      pids+=($!)
      wait_log "$out/$label-${names[$i]}.server.log" "Memory pool end" 180 "${pids[$i]}"
    done
    for i in $(seq 0 $last); do wait_ready $((30000 + i)) 300 "${pids[$i]}"; done
    ps_sidecars > "$out/ps-start.txt"
    if [ "$step" = sidecar ]; then
      acc=()
      for i in 0 1 2; do
        python3 -m bench.shared_context --url "http://127.0.0.1:$((30000 + i))" --label "mosaic-r3-${names[$i]}" \
          --lengths 2048 4096 --samples 4 --tokenizer "$M" --reader-pause 1.0 \
          --out "$out/shared-${names[$i]}.json" > "$out/shared-${names[$i]}.log" 2>&1 &
        acc+=($!)
      done
      for j in "${acc[@]}"; do wait "$j" || echo "shared_context rc=$?"; done
      ps_sidecars > "$out/ps-after-accuracy.txt"
    fi
    # sidecar-itl: ITL_ROUNDS (default 2) rounds of the loads, the servers in turn within each round, so that an
    # order or drift effect shows as a difference between rounds (the eighteenth run's off server was 1.1 ms slower
    # at the median than both sidecar servers, measured first); each load starts from an empty radix cache
    rounds=1
    [ "$step" != sidecar-itl ] || rounds="${ITL_ROUNDS:-2}"
    for r in $(seq 1 "$rounds"); do
      for i in $itl_servers; do
        tag="${names[$i]}"
        [ "$r" = 1 ] || tag="${names[$i]}-round$r"
        others=()
        for j in $(seq 0 $last); do [ "$j" = "$i" ] || others+=($((30000 + j))); done
        [ ${#others[@]} = 0 ] || wait_quiet "${QUIET_S:-60}" "${others[@]}" > "$out/quiet-before-itl-$tag.txt"
        curl -s -X POST "http://127.0.0.1:$((30000 + i))/flush_cache" > /dev/null || true
        curl -s "http://127.0.0.1:$((30000 + i))/metrics" > "$out/metrics-before-itl-$tag.txt" || true
        [ "$r" != 1 ] || stacks_mark "r3-${names[$i]}" before
        label=$(server_label "${names[$i]}")
        seen=$(wc -l < "$out/$label-${names[$i]}.server.log")
        timeout 100 python3 -m sglang.bench_serving --backend sglang --host 127.0.0.1 --port $((30000 + i)) \
          --model "$M" --tokenizer "$M" --dataset-name generated-shared-prefix --gsp-num-groups 4 \
          --gsp-prompts-per-group 16 --gsp-system-prompt-len 4096 --gsp-question-len 128 \
          --gsp-output-len "$itl_output_len" \
          --max-concurrency 16 --output-file "$out/itl-$tag.jsonl" > "$out/itl-$tag.log" 2>&1 &
        load=$!
        profile=0
        [ "${PROFILE_ITL:-0}" = 0 ] || [ "$r" != 1 ] || profile=1
        # PROFILE_ITL=N: the load's GPU kernels over N decode steps under torch's profiler, from its first decode
        # batch of 12 or more requests; the trace is summed by kernel (bench.profile_summary), split into steps
        # (bench.step_timeline) and brought back as $OUT/trace-<server>.trace.json.gz. The profiler perturbs the
        # load it watches: run it in a call of its own, not beside the rounds whose step times count
        if [ "$profile" = 1 ]; then
          deadline=$((SECONDS + 60))
          until tail -n +$((seen + 1)) "$out/$label-${names[$i]}.server.log" \
              | grep -qE "Decode batch, #running-req: (1[2-9]|[2-9][0-9])"; do
            [ $SECONDS -lt $deadline ] || { echo "profile $tag: no decode batch of 12" >&2; break; }
            sleep 0.2
          done
          start_profile $((30000 + i)) "$out/trace-$tag" "$PROFILE_ITL" > "$out/trace-$tag.response.txt"
        fi
        wait "$load" || echo "bench $tag rc=$?"
        if [ "$profile" = 1 ]; then
          # a load shorter than N steps leaves the profiler running: stop it, so that it writes its trace
          compgen -G "$out/trace-$tag/*.trace.json.gz" > /dev/null \
            || curl -s -m 120 -X POST "http://127.0.0.1:$((30000 + i))/stop_profile" > /dev/null || true
          wait_trace "$out/trace-$tag" || echo "profile $tag: no trace" >&2
          python3 -m bench.profile_summary "$out/trace-$tag"/*.trace.json.gz > "$out/profile-$tag.txt" 2>&1 || true
          python3 -m bench.step_timeline "$out/trace-$tag"/*.trace.json.gz > "$out/steps-$tag.txt" 2>&1 || true
          # the trace travels as a file of its own beside the step's archive (the device tool's limit is 16 MiB a
          # file: a long window's trace would take the archive over it), or stays behind, its summaries kept
          for trace in "$out/trace-$tag"/*.trace.json.gz; do
            [ -f "$trace" ] || continue
            if [ "$(stat -c %s "$trace")" -le $((15 << 20)) ]; then mv "$trace" "$OUT/trace-$tag.trace.json.gz"
            else
              echo "profile $tag: trace of $(du -sh "$trace" | cut -f1) left behind (over 15 MiB)"; rm -f "$trace"
            fi
          done
        fi
        ps_sidecars > "$out/ps-after-itl-$tag.txt"
        # decode step times without prefill steps (the ITL above includes the steps that carry a prefill chunk)
        curl -s "http://127.0.0.1:$((30000 + i))/metrics" > "$out/metrics-after-itl-$tag.txt" || true
        python3 -m bench.decode_steps "$out/metrics-before-itl-$tag.txt" \
          "$out/metrics-after-itl-$tag.txt" > "$out/decode-steps-$tag.txt" 2>&1 || true
        [ "$r" != 1 ] || stacks_summary "r3-${names[$i]}"
      done
    done
    for i in $(seq 0 $last); do
      curl -s "http://127.0.0.1:$((30000 + i))/metrics" > "$out/metrics-${names[$i]}.txt" || true
    done
    if [ "${STEP_TRACE:-0}" != 0 ]; then
      sleep 2  # the schedulers' idle flush
      for i in $(seq 0 $last); do
        for trace in "$out/steptrace-${names[$i]}".*.csv; do
          [ -f "$trace" ] || continue
          python3 -m bench.step_trace "$trace" > "${trace%.csv}.txt" 2>&1 || echo "step_trace ${names[$i]} rc=$?"
          gzip -9f "$trace"
        done
      done
    fi
    if [ "${SYNC_AUDIT:-0}" != 0 ]; then
      sleep 2  # the schedulers' idle write
      for i in $(seq 0 $last); do
        [ -f "$out/syncs-${names[$i]}" ] || { echo "sync audit ${names[$i]}: no file"; continue; }
        python3 -m bench.stack_summary "$out/syncs-${names[$i]}" --top 12 > "$out/syncs-${names[$i]}.txt" 2>&1 \
          || echo "stack_summary syncs ${names[$i]} rc=$?"
        echo "host waits, ${names[$i]}: $(head -1 "$out/syncs-${names[$i]}.txt")"
        sed -n '/^leaves/,$p' "$out/syncs-${names[$i]}.txt" | head -13
      done
    fi
    # issue #8's request cases against the sidecar-on server (the defaults users get)
    [ "$step" = sidecar-itl ] || [ -n "${SKIP_BAD_INPUT:-}" ] || python3 -m bench.bad_input \
      --url http://127.0.0.1:30002 --out "$out/bad-input.json" > "$out/bad-input.log" 2>&1 || echo "bad_input rc=$?"
    kill "${pids[@]}" 2>/dev/null || true
    ;;
  sweep)
    # stock SGLang (triton) and mosaic r3 in turn, one server each: output throughput over concurrency (random ids,
    # shared prefixes) and served TPOT over context length; points sized to fit one call (4 requests at concurrency 1).
    # WORKLOAD=random|shared runs one workload (the seventh run's call covered only the random ids' points); merge the
    # calls with `python -m bench.serving_throughput --merge DIR... --out DIR`
    M="$(bash bench/device_smollm2.sh)"
    random_ids='--dataset-name random-ids --random-input-len 4000 --random-output-len 64 --random-range-ratio 1.0'
    shared='--dataset-name generated-shared-prefix --gsp-num-groups 4 --gsp-prompts-per-group 8'
    shared+=' --gsp-system-prompt-len 4096 --gsp-question-len 128 --gsp-output-len 64'
    workloads=()
    case "${WORKLOAD:-both}" in
      random) workloads=(--workload "random=$random_ids") ;;
      shared) workloads=(--workload "shared=$shared") ;;
      both) workloads=(--workload "random=$random_ids" --workload "shared=$shared") ;;
      *) echo "WORKLOAD: expected random, shared or both, got ${WORKLOAD}" >&2; exit 2 ;;
    esac
    timeout $(( $(left) - 10 )) python3 -m bench.serving_throughput --model "$M" --configs dense mosaic-r3 \
      --dense-backend triton --server-args "--dtype bfloat16 --mem-fraction-static 0.5 --disable-prefill-cuda-graph \
      --cuda-graph-max-bs 32" "${workloads[@]}" \
      --concurrency 1 8 32 --prompts-per-slot 2 --min-prompts 4 \
      --budget-seconds $(( $(left) - 30 )) --point-timeout 120 --ready-timeout 240 \
      --out "$out" > "$out/sweep.log" 2>&1 || echo "sweep rc=$?"
    ;;
  tpot)
    # issue #4's TPOT over context on the 8B shape (dummy weights): prompts of 32,768 and 130,048 tokens, 1 and 16
    # requests at once (SGLang queues what its pool cannot hold), 64 output tokens; one configuration per call
    # (CONFIG=mosaic-r4 by default, or dense, fp8); merge the calls with
    # `python -m bench.serving_throughput --merge DIR... --out DIR`; MOSAIC_ARGS adds flags to a mosaic
    # configuration's server (e.g. "--mosaic-overlap-schedule on")
    config="${CONFIG:-mosaic-r4}"
    extra=""
    case "$config" in mosaic*) extra="${MOSAIC_ARGS:-}" ;; esac
    timeout $(( $(left) - 10 )) python3 -m bench.serving_throughput --model "$MKV_MODELS/llama-3.1-8b-shape" \
      --configs "$config" --dense-backend flashinfer --server-args "--load-format dummy \
      --mem-fraction-static 0.85 --disable-prefill-cuda-graph --cuda-graph-max-bs 16 --context-length 131072 \
      --enable-metrics $extra" --context-lengths 32768 130048 --context-batch 1 16 --context-output-len 64 \
      --budget-seconds $(( $(left) - 30 )) --point-timeout 400 --ready-timeout 300 --out "$out" \
      > "$out/tpot.log" 2>&1 || echo "tpot rc=$?"
    ;;
  kernels)
    # the GPU-only tests first (bf16, large launches, the startup choices' output invariance), arena compaction on
    # CUDA, the sidecar bridge's cost, the seal planner's cost and profile, then (budget allowing) the other chan drop
    # methods and the rest of the kernel tests compiled for the GPU. Profiler traces are summarized and dropped (the
    # ninth run's traces made the results too slow to pack in the call). SEAL_ONLY=1: the estimate terms kernel's
    # tests compiled for the GPU and the late-compile watch's, then the seal planner's runs, nothing else
    if [ "${SEAL_ONLY:-0}" = 1 ]; then
      timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_estimate_terms.py \
        tests/test_estimate_terms_select.py tests/test_late_compiles.py tests/test_seal_spans.py \
        tests/test_pinned_staging.py tests/test_metrics.py -m "not slow" \
        > "$out/estimate-terms-tests.log" 2>&1 || echo "estimate terms tests rc=$?"
      tail -3 "$out/estimate-terms-tests.log"
    else
      timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/test_decode_tune.py \
        tests/test_chan_drop_select.py tests/test_estimate_terms_select.py tests/test_late_compiles.py \
        tests/test_seal_spans.py tests/test_pinned_staging.py tests/test_metrics.py \
        > "$out/gpu-tests.log" 2>&1 \
        || echo "gpu tests rc=$?"
      tail -3 "$out/gpu-tests.log"
      # the backend's GPU tests: captured decode graphs replay like eager, and the overlap scheduler's decode plan does
      # not wait for the step in flight
      timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/integration_cpu/test_cuda_graph_decode.py \
        > "$out/graph-gpu-tests.log" 2>&1 || echo "graph gpu tests rc=$?"
      tail -3 "$out/graph-gpu-tests.log"
      # arena compaction on the GPU (the store tests run on CUDA when there is one)
      timeout 90 python3 -m pytest -q -p no:cacheprovider tests/pool/test_store_compaction.py \
        > "$out/compaction-tests.log" 2>&1 || echo "compaction tests rc=$?"
      tail -1 "$out/compaction-tests.log"
      # where the sidecar bridge's scheduler time goes (the tenth run's 8B server: 16 ms a seal's submission, 18 ms a
      # job's landing; the stand-in's: about 1 ms each)
      timeout 120 python3 -m bench.sidecar_cost --device cuda --pages 128 96 112 64 --seals 20 --ticks 5 --profile 30 \
        > "$out/sidecar-cost.txt" 2>&1 || echo "sidecar_cost rc=$?"
      # the seals' copies each in a pinned block of its own (torch's allocator), as before the reused staging buffers
      timeout 120 python3 -m bench.sidecar_cost --device cuda --pages 128 96 112 64 --seals 20 --ticks 5 --staging off \
        > "$out/sidecar-cost-staging-off.txt" 2>&1 || echo "sidecar_cost staging off rc=$?"
    fi
    # the seal planner at 128 pages with the default chan drop (its peak memory and profile), then larger planner
    # chunks (segments:bytes; the default 8192:256 MiB makes 4 chunks of a 128-page seal of the 8B shape, 2,173
    # kernel ops against 820 in one chunk: time against peak memory), then, while the budget lasts, the other chan
    # drop methods, 8 pages and the chan rank kernel against torch's top-k; each one-call plan timed again with the
    # estimator's fused channel terms (--also-estimate-terms kernel: the same run, plans compared)
    for run in 128:kernel 128:kernel:16384:536870912 128:kernel:32768:1073741824 128:topk 128:sort 8:kernel 8:topk \
        8:sort; do
      IFS=: read -r pages method segs chunk_bytes <<< "$run"
      tag="$pages-$method${segs:+-$segs}"
      [ "$(left)" -gt 150 ] || { echo "seal_cost $tag skipped (budget)"; continue; }
      prof=()
      [ "$run" != 128:kernel ] || prof=(--profile "$out/seal-profile-$pages")
      [ -z "$segs" ] || prof+=(--max-segments "$segs" --max-chunk-bytes "$chunk_bytes")
      timeout 90 python3 -m bench.seal_cost --layers 32 --kv-heads 8 --pages "$pages" --page-size 64 \
        --head-dim 128 --device cuda --dtype fp16 --repeats 3 --warmup 1 --json --no-count --chan-drop "$method" \
        --estimate-terms torch --also-estimate-terms kernel ${prof[@]+"${prof[@]}"} > "$out/seal-$tag.json" \
        2> "$out/seal-$tag.log" \
        || echo "seal_cost $tag rc=$?"
      rm -f "$out/seal-profile-$pages"/*.json.gz
    done
    if [ "${SEAL_ONLY:-0}" = 0 ] && [ "$(left)" -gt 150 ]; then
      timeout 120 python3 -m bench.chan_rank --segments 32768 --seg-size 64 --head-dim 128 --json \
        > "$out/chan-rank.json" 2> "$out/chan-rank.log" || echo "chan_rank rc=$?"
    fi
    if [ "${SEAL_ONLY:-0}" = 0 ] && [ "$(left)" -gt 90 ]; then
      timeout $(( $(left) - 30 )) python3 -m pytest -q -p no:cacheprovider tests/kernels > "$out/kernel-tests.log" \
        2>&1 || echo "kernel tests rc=$?"
      tail -3 "$out/kernel-tests.log"
    fi
    ;;
  seal-graphs)
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_seal_graphs.py \
      tests/integration_cpu/test_pending_seal.py tests/kernels/test_pack_layers.py tests/kernels/test_pack.py \
      > "$out/seal-graphs-tests.log" 2>&1 || echo "seal graphs tests rc=$?"
    tail -3 "$out/seal-graphs-tests.log"
    for pages in 128 100; do
      [ "$(left)" -gt 100 ] || { echo "seal_cost $pages skipped (budget)"; continue; }
      timeout 120 python3 -m bench.seal_cost --layers 32 --kv-heads 8 --pages "$pages" --page-size 64 --head-dim 128 \
        --device cuda --dtype fp16 --repeats 3 --warmup 1 --no-count --graph-pages 64,128,160 \
        > "$out/seal-graphs-$pages.txt" 2>&1 || echo "seal_cost $pages rc=$?"
      tail -6 "$out/seal-graphs-$pages.txt"
    done
    # the pack, the seal's other half (the sidecar load's seals are about 24 pages)
    for pages in 32 128; do
      [ "$(left)" -gt 60 ] || { echo "pack_cost $pages skipped (budget)"; continue; }
      timeout 120 python3 -m bench.pack_cost --layers 32 --kv-heads 8 --pages "$pages" --page-size 64 --head-dim 128 \
        --device cuda --dtype fp16 --repeats 3 --warmup 1 --profile 40 --launches > "$out/pack-cost-$pages.txt" \
        2>&1 || echo "pack_cost $pages rc=$?"
      grep -A14 "^pack of" "$out/pack-cost-$pages.txt"
      grep "pack kernel alone" "$out/pack-cost-$pages.txt"
    done
    ;;
  bracket)
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/kernels/test_lagrange_bracket.py \
      tests/kernels/test_lagrange_start.py tests/kernels/test_lagrange_fixup.py > "$out/bracket-tests.log" 2>&1 \
      || echo "bracket tests rc=$?"
    tail -3 "$out/bracket-tests.log"
    for shape in "4 16 16" "8 16 16" "32 128 128"; do  # layers, pages, graph bucket
      read -r layers pages bucket <<< "$shape"
      [ "$(left)" -gt 60 ] || { echo "seal_cost $layers x $pages skipped (budget)"; continue; }
      timeout 150 python3 -m bench.seal_cost --layers "$layers" --kv-heads 8 --pages "$pages" --page-size 64 \
        --head-dim 128 --device cuda --dtype fp16 --repeats 5 --warmup 2 --graph-pages "$bucket" \
        --also-lagrange-bracket kernel > "$out/seal-cost-$layers-$pages.txt" 2>&1 \
        || echo "seal_cost $layers x $pages rc=$?"
      grep -E "^seal of|one-call|seal graphs|bracket" "$out/seal-cost-$layers-$pages.txt"
    done
    ;;
  slice-profile)
    runs=""
    for shape in ${SLICE_SHAPES:-4x16 8x16}; do
      runs="$runs $shape:eager"
      for compiled in ${SLICE_COMPILE:-}; do
        [[ "$compiled" =~ ^(lagrange|planner)$ ]] || { echo "SLICE_COMPILE: expected lagrange or planner, got $compiled"
                                                       exit 2; }
        runs="$runs $shape:$compiled"
      done
    done
    for run in $runs; do
      shape="${run%:*}" compiled="${run#*:}"
      [[ "$shape" =~ ^[0-9]+x[0-9]+$ ]] || { echo "SLICE_SHAPES: expected LAYERSxPAGES, got $shape"; exit 2; }
      layers="${shape%x*}" pages="${shape#*x}"
      [ "$(left)" -gt 60 ] || { echo "slice $run skipped (budget)"; continue; }
      # the 16-page files keep their names of the forty-sixth run (slice-cost-4.txt...)
      name="$layers"; [ "$pages" = 16 ] || name="$layers-$pages"
      bracket=(--also-lagrange-bracket kernel)
      if [ "$compiled" != eager ]; then name="$name-$compiled" bracket=(); fi
      t_run=$SECONDS
      MOSAICKV_COMPILE_LAGRANGE="$([ "$compiled" = lagrange ] && echo 1 || echo 0)" \
        MOSAICKV_COMPILE_PLANNER="$([ "$compiled" = planner ] && echo 1 || echo 0)" timeout 200 \
        python3 -m bench.seal_cost --layers "$layers" --kv-heads 8 --pages "$pages" --page-size 64 \
        --head-dim 128 --device cuda --dtype fp16 --chan-drop kernel --estimate-terms kernel --repeats 5 --warmup 2 \
        --no-count --graph-pages "$pages" "${bracket[@]}" --profile "$out/slice-profile-$name" \
        > "$out/slice-cost-$name.txt" 2>&1 || echo "seal_cost $run rc=$?"
      echo "slice $name: $((SECONDS - t_run)) s" | tee -a "$out/slice-cost-$name.txt"
      grep -E "^seal of|one-call|seal graphs|bracket" "$out/slice-cost-$name.txt" || true
      python3 -m bench.profile_summary --top 30 "$out/slice-profile-$name"/*_trace.json.gz \
        > "$out/slice-profile-$name.txt" 2>&1 || echo "profile_summary $run rc=$?"
      grep "kernel events" "$out/slice-profile-$name.txt" || true
      rm -f "$out/slice-profile-$name"/per_layer_trace.json.gz
    done
    ;;
  ncu)
    # hardware counters (Nsight Compute, clocks left alone) of one launch each of the sparse decode split kernel, the
    # segment scores kernel and FlashInfer's decode kernel, 8B shape, batch 32, at 8k and 128k: memory throughput,
    # occupancy, stall reasons; text reports only (the .ncu-rep files are dropped)
    ncu_bin="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)"
    if [ -z "$ncu_bin" ]; then echo "ncu not found" | tee "$out/ncu-missing.txt"; exit 0; fi
    # one kernel per run (--launch-count counts every matching launch); most wanted first
    # (FlashInfer's decode of the GQA shape is its tensor-core BatchPrefillWithPagedKVCacheKernel: the thirteenth
    # run's "BatchDecode" matched no launch)
    for case in 8192:_sparse_decode_split_kernel 8192:BatchPrefillWithPagedKVCache 131072:_sparse_decode_split_kernel \
        8192:_segment_scores_main_kernel 131072:BatchPrefillWithPagedKVCache; do
      ctx="${case%%:*}" kernel="${case#*:}"
      [ "$(left)" -gt 60 ] || break
      timeout $(( $(left) - 30 )) "$ncu_bin" --clock-control none --set full --launch-skip 3 --launch-count 1 \
        -k "regex:$kernel" -o "$out/$kernel-$ctx" python3 -m bench.decode_speed --shapes llama-3.1-8b \
        --contexts "$ctx" --batches 32 --skip-pack --rep-ms 10 --check-max-ctx 0 \
        --out "$out/decode-speed-$kernel-$ctx.under-ncu.json.txt" > "$out/ncu-$kernel-$ctx.log" 2>&1 \
        || echo "ncu $case rc=$?"  # (timed under ncu: not a .json, so bench.figures does not draw it)
      if [ -f "$out/$kernel-$ctx.ncu-rep" ]; then
        "$ncu_bin" --import "$out/$kernel-$ctx.ncu-rep" --page details > "$out/ncu-$kernel-$ctx.txt" 2>&1 || true
        rm -f "$out/$kernel-$ctx.ncu-rep"
      fi
    done
    ;;
  select)
    # the decode selection on the GPU: its tests, the pending seal's and the seal graphs' (bf16), then
    # bench.decode_speed at the thirtieth run's short context (4,608 tokens: 64 segments a head, within the default read
    # budget, so neither scored nor sorted) and at 32,768 (sorted), batch 16, CUDA graphs: score_and_select against the
    # scores and torch.topk it replaced, side by side, with the sparse decode and FlashInfer of the same cases
    timeout 180 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_segment_scores.py \
      tests/integration_cpu/test_pending_seal.py tests/test_seal_graphs.py > "$out/gpu-tests.log" 2>&1 \
      || echo "gpu tests rc=$?"
    tail -3 "$out/gpu-tests.log"
    # every chan mode of the sparse decode on the GPU against the fp64 reference (a Triton compile a case: 120 s ran
    # 3 of them in the thirty-second run)
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_sparse_decode.py \
      -k chan_modes > "$out/gpu-tests-decode.log" 2>&1 || echo "decode gpu tests rc=$?"
    tail -3 "$out/gpu-tests-decode.log"
    timeout $(( $(left) - 15 )) python3 -m bench.decode_speed --shapes llama-3.1-8b --contexts 4608 32768 \
      --batches 16 --cuda-graph --skip-pack --out "$out/select.json" > "$out/select.log" 2>&1 \
      || echo "decode_speed rc=$?"
    grep -A6 "the selection alone" "$out/select.log" || tail -5 "$out/select.log"
    ;;
  tune)
    # the sparse decode launch and chan-mode tuning (8B shape, 8k and 128k, batch 16 and 32) with the whole budget
    timeout $(( $(left) - 15 )) python3 -m bench.decode_speed --shapes llama-3.1-8b --contexts 8192 131072 \
      --batches 16 32 --cuda-graph --tune --skip-pack --out "$out/tune.json" > "$out/tune.log" 2>&1 \
      || echo "decode_speed rc=$?"
    ;;
  8b)
    # mosaic first (its decode step is the open question), then stock SGLang while the call has time left;
    # both with decode CUDA graphs (batch sizes up to 32); MOSAIC_ARGS adds mosaic flags (e.g. "--mosaic-cuda-graph
    # off"), STOCK=0 skips stock, HOST_PROFILE=1 writes the mosaic server's plan profiles (host-profile.<kind>),
    # HOST_SAMPLES=1 samples both schedulers' stacks (stacks_summary above) over their bench
    bench_timeout="${BENCH_TIMEOUT:-150}"
    common=(--model-path "$MKV_MODELS/llama-3.1-8b-shape" --host 127.0.0.1 --load-format dummy
            --mem-fraction-static "${MEM_FRACTION:-0.4}" --disable-prefill-cuda-graph --cuda-graph-max-bs 32
            --context-length "${CONTEXT_LEN:-16384}" --enable-metrics)
    # --tokenize-prompt: prompts of exactly IN_LEN tokens (as text, random ids re-tokenize to 1.77x as many: before the
    # twenty-first run "8,000 in" was 14,208 tokens a prompt)
    bench=(--backend sglang --host 127.0.0.1 --model "$MKV_MODELS/llama-3.1-8b-shape"
           --tokenizer "$MKV_MODELS/llama-3.1-8b-shape" --dataset-name random-ids --num-prompts "${PROMPTS:-32}"
           --random-input-len "${IN_LEN:-8000}" --random-output-len "${OUT_LEN:-256}" --random-range-ratio 1.0
           --tokenize-prompt)
    # HOST_PROFILE=1: the mosaic server profiles its plan calls (MOSAICKV_PROFILE; its numbers are then not to be
    # compared with stock's: cProfile slows the Python it watches)
    host_profile=""
    [ "${HOST_PROFILE:-0}" = 0 ] || host_profile="$out/host-profile"
    if [ "${MOSAIC:-1}" = 1 ]; then  # MOSAIC=0: stock (and FP8=1's fp8) alone, for a workload too long for one call
      # shellcheck disable=SC2086
      MOSAICKV_PROFILE="$host_profile" MOSAICKV_STACK_SAMPLES="$(stacks "mosaic-r${ratio}")" \
        python3 -m sglang.launch_server "${common[@]}" --port 30000 \
        --kv-compressor mosaic --mosaic-compression-ratio "$ratio" ${MOSAIC_ARGS:-} \
        > "$out/mosaic-r${ratio}.server.log" 2>&1 &
      mosaic_pid=$!
      wait_ready 30000 300
      curl -s http://127.0.0.1:30000/get_server_info > "$out/mosaic-r${ratio}.info.json" || true
      curl -s http://127.0.0.1:30000/metrics > "$out/metrics-before-bench-mosaic-r${ratio}.txt" || true
      stacks_mark "mosaic-r${ratio}" before
      timeout "$bench_timeout" python3 -m sglang.bench_serving "${bench[@]}" --port 30000 \
        --output-file "$out/bench-mosaic-r${ratio}.jsonl" > "$out/bench-mosaic-r${ratio}.log" 2>&1 \
        || echo "mosaic bench rc=$?"
      # decode step p50/p99 without prefill steps, and the time sealing and the sidecar took during the bench
      curl -s http://127.0.0.1:30000/metrics > "$out/metrics-after-bench-mosaic-r${ratio}.txt" || true
      python3 -m bench.decode_steps "$out/metrics-before-bench-mosaic-r${ratio}.txt" \
        "$out/metrics-after-bench-mosaic-r${ratio}.txt" > "$out/decode-steps-mosaic-r${ratio}.txt" 2>&1 || true
      python3 -m bench.server_latency "$out/metrics-before-bench-mosaic-r${ratio}.txt" \
        "$out/metrics-after-bench-mosaic-r${ratio}.txt" > "$out/latency-mosaic-r${ratio}.txt" 2>&1 || true
      stacks_summary "mosaic-r${ratio}"  # (after the scrape: its wait for the sampler's write is idle time)
      # PROFILE=0 skips it (its load is 16 more prompts of IN_LEN tokens)
      [ "${PROFILE:-1}" = 0 ] || profile_steps 30000 "$out/mosaic-r${ratio}.server.log" "mosaic-r${ratio}" \
        || echo "mosaic profile rc=$?"
      ps_sidecars > "$out/ps.txt"
      kill "$mosaic_pid" 2>/dev/null || true
      wait "$mosaic_pid" 2>/dev/null || true
    fi
    if [ "${STOCK:-1}" = 1 ]; then
      # one server at a time: each sizes its KV pool from the memory it finds free
      MOSAICKV_STACK_SAMPLES="$(stacks dense)" python3 -m sglang.launch_server "${common[@]}" --port 30001 \
        --attention-backend flashinfer > "$out/dense.server.log" 2>&1 &
      dense_pid=$!
      wait_ready 30001 300
      curl -s http://127.0.0.1:30001/get_server_info > "$out/dense.info.json" || true
      # the servers' own TTFT and latency histograms (bench_serving reports a TTFT of 0 with --tokenize-prompt):
      # bench.server_latency, each server's latency-<name>.txt
      curl -s http://127.0.0.1:30001/metrics > "$out/metrics-before-bench-dense.txt" || true
      stacks_mark dense before
      timeout "$bench_timeout" python3 -m sglang.bench_serving "${bench[@]}" --port 30001 \
        --output-file "$out/bench-dense.jsonl" > "$out/bench-dense.log" 2>&1 || echo "dense bench rc=$?"
      curl -s http://127.0.0.1:30001/metrics > "$out/metrics-after-bench-dense.txt" || true
      python3 -m bench.server_latency "$out/metrics-before-bench-dense.txt" "$out/metrics-after-bench-dense.txt" \
        > "$out/latency-dense.txt" 2>&1 || true
      stacks_summary dense
      # the stock profile only on request (PROFILE_STOCK=1): with it the step runs past a 600 s call (ninth run)
      [ "${PROFILE_STOCK:-0}" = 0 ] || profile_steps 30001 "$out/dense.server.log" dense || echo "dense profile rc=$?"
      kill "$dense_pid" 2>/dev/null || true
      wait "$dense_pid" 2>/dev/null || true
    fi
    if [ "${FP8:-0}" = 1 ]; then
      python3 -m sglang.launch_server "${common[@]}" --port 30002 --attention-backend flashinfer \
        --kv-cache-dtype fp8_e4m3 > "$out/fp8.server.log" 2>&1 &
      fp8_pid=$!
      wait_ready 30002 300
      curl -s http://127.0.0.1:30002/get_server_info > "$out/fp8.info.json" || true
      curl -s http://127.0.0.1:30002/metrics > "$out/metrics-before-bench-fp8.txt" || true
      timeout "$bench_timeout" python3 -m sglang.bench_serving "${bench[@]}" --port 30002 \
        --output-file "$out/bench-fp8.jsonl" > "$out/bench-fp8.log" 2>&1 || echo "fp8 bench rc=$?"
      curl -s http://127.0.0.1:30002/metrics > "$out/metrics-after-bench-fp8.txt" || true
      python3 -m bench.server_latency "$out/metrics-before-bench-fp8.txt" "$out/metrics-after-bench-fp8.txt" \
        > "$out/latency-fp8.txt" 2>&1 || true
      kill "$fp8_pid" 2>/dev/null || true
      wait "$fp8_pid" 2>/dev/null || true
    fi
    ;;
  *)
    echo "unknown step $step" >&2
    exit 2
    ;;
esac
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpus.csv" || true
echo "step $step done after $((SECONDS - t_start)) s"
