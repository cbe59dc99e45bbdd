#!/usr/bin/env bash
# GPU runs through the device tool, one call each (bench/README.md). Copies each run's new result
# files to $OUT as soon as it ends, so a call stopped at its time limit still returns what finished.
#
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh check          # CPU + GPU kernel tests, decode-7b with the HF peer
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh host           # GPU kernel tests, host time of a batch-128 launch
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh launch         # decode-7b at batch 128 and 32, profiled
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh fuse           # decode-7b, projections fused vs not
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh kernels        # bench/kernels: LoRA and attention
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh attn-trace     # decode attention sweep at the trace's lengths
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh attn-t6        # decode attention at T6's shape, split keys or not, longest first or not
#   JLORA_COMMIT=<sha> ATTN='{...}' bash bench/device_runs.sh attn-ab  # trace-shaped decode steps: ATTN's attention fields, then the tuned
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh decode-ab      # trace-shaped decode steps: split keys, rows in place, HLO
#   JLORA_COMMIT=<sha> TAG=-x bash bench/device_runs.sh step  # trace-shaped steps, profiled, and a 2-layer step's optimised HLO
#   JLORA_COMMIT=<sha> ARGSETS='--materialize-norms off;...' bash bench/device_runs.sh args-ab  # trace-shaped steps with each set of mixed_step flags, then none (BASE: flags for every run)
#   JLORA_COMMIT=<sha> LORASETS='{"by_adapter_min_rank":16};{"chunk_units":32}' bash bench/device_runs.sh lora-ab  # LoRA kernel tests on the GPU (LORATESTS: a -k expression), then n = 5-shaped steps with each set of LoraTunables fields, then none
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh mixed-ab       # trace-shaped steps: LoRA and attention in one launch each (mixed_launch), concurrent CUDA-graph scheduling, neither (MIXEDSETS: other sets)
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh ncu-attn       # decode attention under ncu at 4-28 trace rows (SETS of AttentionTunables fields)
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh ncu-sgmv       # a chunk's SGMV under ncu (CHUNKS, RANKS, SETS of LoraTunables fields)
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh launch-floor   # an empty Pallas launch's cost in a chain (grid 1..2048, 1-4 warps): the floor under the LoRA launches
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh lora-trace     # BGMV launch shapes at slora-trace's n = 5 decode layer (17 tokens, 5 adapters, bucket 64)
#   JLORA_COMMIT=<sha> FLAGSETS='--a;--b --c' bash bench/device_runs.sh xla-ab  # trace-shaped steps under each XLA_FLAGS set, then none
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh fused          # LoRA in one launch: kernel sweep, then decode-7b
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh lora           # LoRA launch shapes by batch (traced), then decode-7b on them
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh slora          # slora-trace at n = 5..2000, stopped at 540 s (RATE=8, ROWS=mixed, SEQS=1 prompt a step, BUCKETS=64,128,192 chunk lengths below CHUNK, ATTN='{"split_keys": 0}' decode attention fields, NORMS=off: no materialize_norms, LORA='{"chunk_units":32}' LoRA kernel fields, PREFILL='{"mixed_launch":true}' prefill attention fields, CBUF=concurrent CUDA-graph scheduling, PROFILE=6,7.5: each n's trace replayed again to 7.5 s, profiled over 6-7.5 s, DECODE_BUCKETS=16,32 / MIXED_BUCKETS=16,32: decode rows' buckets in decode-only / mixed steps, SMI=1: the GPU's clocks sampled to $OUT/smi.csv, REPEATS=3: each n's trace replayed 3 times)
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh slora-rates    # slora-trace at n = 100 over offered rates (RATE, SWEEP)
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh slora-cublas   # the same with XLA's cuBLAS GEMMs (no Triton GEMM fusions)
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh mixed          # LoRA kernel tests, chunk steps: one mixed call vs two calls
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh cmdbuf         # decode-7b with XLA command buffers on
#   JLORA_COMMIT=<sha> bash bench/device_runs.sh mg GEOMETRY    # tensor parallel mp 4, 2, 1 (4-GPU kinds)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
: "${JLORA_COMMIT:?set JLORA_COMMIT: the checkout travels without .git}"
: "${OUT:?run through the device tool, which sets OUT}"
marker=$(mktemp)
# XLA's GEMM autotuning: AUTOTUNE=dump writes what this call's compiles chose to $OUT/xla-autotune.textproto
# (commit it under bench/autotune/); AUTOTUNE=FILE loads such a file, so that the compiles skip the search
# and every run of a shape gets the same GEMM kernels
case "${AUTOTUNE:-}" in
  "") ;;
  dump) export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_dump_autotune_results_to=$OUT/xla-autotune.textproto" ;;
  *) export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_load_autotune_results_from=$(realpath "$AUTOTUNE")" ;;
esac
save() { find bench/results -newer "$marker" -type f -exec cp {} "$OUT/" \; ; }
run() { echo "== $*"; "$@" 2>&1 | grep -vE "Warning|warn\(" | tail -"${TAIL:-12}"; save; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# slora-trace on the Llama-2-7B geometry: the flags every slora mode shares, and the trace at every n
slora_common=(--model llama2-7b --pages 3000 --impl auto --layer-loop unrolled --one-page-bucket
  --partial "$OUT/slora-partial.json")
# bench.mixed_step's decode steps at the trace's shape: 17 rows of trace lengths, profiled
trace_shape=(--decodes 17 --decode-lengths trace --prompt 512 --prompts 1 --chunk 128 --profile-decode)
slora_trace() {
  local below=""  # default chunk buckets: 64, 128, 192 where under CHUNK
  for b in 64 128 192; do [ "$b" -lt "${CHUNK:-256}" ] && below="$below${below:+,}$b"; done
  TAIL=40 run timeout 540 python3 -m bench.slora "${slora_common[@]}" --n "${N:-5,100,1000,2000}" \
    --rate "${RATE:-8}" --duration "${DURATION:-20}" --batch "${BATCH:-32}" --chunk "${CHUNK:-256}" \
    --cold-warm "${COLD:-4}" --rows-in-place "${ROWS:-mixed}" --prefill-seqs "${SEQS:-1}" \
    --chunk-buckets "${BUCKETS-$below}" ${ATTN:+--attention-tunables "$ATTN"} ${NORMS:+--materialize-norms "$NORMS"} \
    ${LORA:+--lora-fields "$LORA"} ${PREFILL:+--prefill-tunables "$PREFILL"} ${CBUF:+--command-buffer-scheduling "$CBUF"} \
    ${PROFILE:+--profile-window "$PROFILE"} ${REPEATS:+--repeats "$REPEATS"} \
    ${DECODE_BUCKETS:+--decode-buckets "$DECODE_BUCKETS"} ${MIXED_BUCKETS:+--mixed-decode-buckets "$MIXED_BUCKETS"}
}

# trace-shaped decode and chunk steps, profiled, once per ';'-separated set in $2 - bench.mixed_step
# flags ($1 = args) or XLA flags ($1 = xla) - then with neither. Each run stops at 300 s: at 200 s three
# runs of the eighteenth session ended with no result (the first on each fresh machine, and the second of
# one call), where the same run alone on the warm machine took 154 s.
trace_ab() {
  local kind=$1 sets i base
  IFS=';' read -ra sets <<< "$2"
  read -ra base <<< "${BASE:-}"  # mixed_step flags every run takes, e.g. --adapters 5 --ranks 16,32,64
  if [ "${NONE:-1}" = first ]; then  # NONE=first: the baseline before the sets (a cut call keeps it)
    TAIL=4 run timeout 300 python3 -m bench.mixed_step "${trace_shape[@]}" "${base[@]}" --tag="-$kind-none"
  fi
  for i in "${!sets[@]}"; do
    if [ "$kind" = xla ]; then
      XLA_FLAGS="${XLA_FLAGS:-} ${sets[$i]}" TAIL=4 run timeout 300 python3 -m bench.mixed_step "${trace_shape[@]}" "${base[@]}" \
        --tag="-xla-$i"
    else  # shellcheck disable=SC2086  # a set holds several flags
      TAIL=4 run timeout 300 python3 -m bench.mixed_step "${trace_shape[@]}" "${base[@]}" ${sets[$i]} --tag="-args-$i"
    fi
  done
  if [ "${NONE:-1}" != 0 ] && [ "${NONE:-1}" != first ]; then  # NONE=0: no baseline (compare with an earlier call's)
    TAIL=4 run timeout 300 python3 -m bench.mixed_step "${trace_shape[@]}" "${base[@]}" --tag="-$kind-none"
  fi
  # the runs side by side (WITH: earlier result files to list with them); shellcheck disable=SC2046,SC2086
  python3 -m bench.step_summary ${WITH:-} $(find bench/results -newer "$marker" -name "mixed-step-*.json")
}

# the optimised HLO of a 2-layer step (decode and chunk steps), for reading its fusions
step_hlo() {
  XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*_step.*" TAIL=2 \
    run python3 -m bench.mixed_step --layers 2 --decodes 17 --prompt 256 --prompts 1 --chunk 128 --tag=-ab-hlo
  find "$OUT/hlo" -type f ! -name "*after_optimizations.txt" -delete 2>/dev/null; ls -la "$OUT/hlo" | head
}

case "${1:-}" in
  check)
    # the C++ CPU kernels built and checked under this image's jax and Python (the CPU backend)
    run env JAX_PLATFORMS=cpu python3 -m pytest -q -x tests/test_cpu_kernels.py
    run python3 -m pytest -q -m gpu -x tests/test_paged_attention_kernel.py
    run python3 -m pytest -q -x tests/test_lora_kernels.py   # every case compiled on the GPU
    run python3 -m bench.hf_peer --out "$OUT/peer.json"
    TAIL=30 run python3 -m bench.decode_7b --impl auto --layer-loop unrolled --profile --peer "$OUT/peer.json" --tag=-check
    ;;
  host)  # the GPU kernel tests, then where a batch-128 step's launch spends its host time
    run python3 -m pytest -q -m gpu -x tests/test_paged_attention_kernel.py
    run python3 -m pytest -q -x tests/test_lora_kernels.py
    TAIL=70 run python3 -m bench.decode_7b --batch 128 --impl auto --layer-loop unrolled --profile \
      --skip-base --no-overlap --tag=-b128-host
    ;;
  launch)  # decode-7b at batch 128 (mixed) and 32 (base and mixed), profiled: device busy vs host launch
    TAIL=40 run python3 -m bench.decode_7b --batch 128 --impl auto --layer-loop unrolled --profile \
      --skip-base --tag=-b128
    TAIL=40 run python3 -m bench.decode_7b --impl auto --layer-loop unrolled --profile --tag=-b32
    ;;
  fuse)  # decode-7b with q/k/v and gate/up fused into one matmul each (the default), then without
    TAIL=30 run python3 -m bench.decode_7b --impl auto --layer-loop unrolled --profile --tag=-fused-proj
    TAIL=4 run python3 -m bench.decode_7b --impl auto --layer-loop unrolled --fuse-projections off \
      --tag=-unfused-proj
    ;;
  kernels)
    run python3 -m bench.kernels.lora
    run python3 -m bench.kernels.attention
    ;;
  attn-trace)  # decode attention as the trace runs it: a 32-row bucket, 17 rows at the trace's lengths
    TAIL=60 run python3 -m bench.kernels.attention --batch 32 --trace-rows 17 --context 1024 \
      --stages "${STAGES:-2}" --cases mha --no-prefill --split-keys "${SPLITS:-0,64,128,256}" \
      --longest-first "${ORDERS:-0,1}"
    ;;
  attn-t6)  # T6's shape (batch 64, context 2,048, MHA and GQA heads): the tuned blocks, unsplit and split
    TAIL=20 run python3 -m bench.kernels.attention --pages-per-block 4 --no-prefill --split-keys "${SPLITS:-0,512}" \
      --longest-first "${ORDERS:-0,1}"
    ;;
  attn-ab)  # trace-shaped decode steps, profiled: with ATTN's attention fields, then the tuned ones
    TAIL=3 run python3 -m bench.mixed_step "${trace_shape[@]}" --attention-tunables "${ATTN:?set ATTN}" --tag=-ab-variant
    TAIL=3 run python3 -m bench.mixed_step "${trace_shape[@]}" --tag=-ab-tuned
    ;;
  step)  # trace-shaped decode and chunk steps, profiled, then a 2-layer step's HLO
    TAIL=24 run python3 -m bench.mixed_step "${trace_shape[@]}" --tag="-step${TAG:-}"
    step_hlo
    ;;
  args-ab)  # trace-shaped steps with each ';'-separated set of mixed_step flags, then without
    trace_ab args "${ARGSETS:?set ARGSETS}"
    ;;
  lora-ab)  # the LoRA kernel tests on the GPU, then slora-trace's n = 5 shape with each set of LoRA fields and without
    run python3 -m pytest -q -x tests/test_lora_kernels.py tests/test_mixed_rows.py ${LORATESTS:+-k "$LORATESTS"}
    sets=""
    IFS=';' read -ra lora_sets <<< "${LORASETS:?set LORASETS}"
    for f in "${lora_sets[@]}"; do sets="$sets${sets:+;}--lora-fields $f"; done
    BASE="${LORABASE:---adapters 5 --ranks 16,32,64}" trace_ab args "$sets"  # LORABASE: another shape
    ;;
  mixed-ab)  # a mixed step's LoRA and attention each in one launch, and XLA's concurrent CUDA-graph
    # scheduling: the one-launch kernels' tests compiled and the engine against the reference under both
    # (test_gpu_kernels_engine_equals_reference), then trace-shaped steps (n = 5's adapters) with
    # both one-launch kernels, with concurrent scheduling, and with neither (~3 min a run: 3 fit a call)
    run timeout 180 python3 -m pytest -q -x tests/test_mixed_rows.py tests/test_paged_engine.py \
      -k "mixed_launch or attention_mixed or gpu_kernels"
    lora='--lora-fields {"mixed_launch":true}' attn='--prefill-tunables {"mixed_launch":true}'
    # the baseline first, then concurrent scheduling: a call cut at its limit loses the last set only
    NONE="${NONE:-first}" BASE="${BASE:---adapters 5 --ranks 16,32,64}" \
      trace_ab args "${MIXEDSETS:---command-buffer-scheduling concurrent;$lora $attn}"
    ;;
  lora-trace)  # one layer's LoRA kernels at slora-trace's n = 5 decode shape: launch-shape sweep, then variants
    TAIL=16 run timeout "${SWEEP_S:-420}" python3 -m bench.kernels.lora_trace_sweep ${QUICK:+--quick}
    ;;
  ncu-attn)  # decode attention under ncu at 4 / 9 / 17 / 28 trace-length rows (5 GiB pool): SETS, ';'-separated
    # AttentionTunables fields (default: the tuned ones, then split and work-list variants); duration and DRAM
    # share a launch, in the order of the sets
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    # (batches of <= 16 rows take small_split_keys, not split_keys)
    sets=${SETS:-'{};{"split_keys":256,"small_split_keys":256};{"split_keys":256,"small_split_keys":256,"work_list":true};{"split_keys":512,"work_list":true}'}
    for rb in "4 16" "9 16" "17 32" "28 32"; do
      read -r rows bucket <<< "$rb"; echo "== $rows rows of $bucket"
      timeout 120 ncu --clock-control none --kernel-name regex:paged_decode --section SpeedOfLight \
        python3 -m bench.kernels.attention_once --layers 10 --trace-rows "$rows" --batch "$bucket" \
        --context 1024 --calls 1 --tunables "$sets" > "$OUT/ncu-attn-$rows.txt" 2>&1
      grep -E "^\{|Duration|DRAM Throughput" "$OUT/ncu-attn-$rows.txt" | cut -c1-150
    done
    ;;
  ncu-sgmv)  # a chunk's SGMV (q/k/v + o) under ncu: CHUNKS x RANKS, SETS of LoraTunables fields
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    sets=${SETS:-'{};{"sgmv_max_splits":4}'}
    for c in ${CHUNKS:-128 192}; do for r in ${RANKS:-16 32}; do
      echo "== chunk $c rank $r"
      timeout 120 ncu --clock-control none --kernel-name regex:sgmv --section SpeedOfLight \
        python3 -m bench.kernels.sgmv_once --chunk "$c" --rank "$r" --fields "$sets" > "$OUT/ncu-sgmv-$c-$r.txt" 2>&1
      grep -E "^  sgmv|Duration|max_abs_err" "$OUT/ncu-sgmv-$c-$r.txt" | sed -E 's/^\{.*"max_abs_err"/err/; s/, Context.*//'
    done; done
    ;;
  launch-floor)  # what an empty Pallas launch costs in a chain, by grid and num_warps (LAUNCHES, GRIDS, WARPS)
    TAIL=16 run timeout 300 python3 -m bench.kernels.launch_floor --launches "${LAUNCHES:-64}" \
      --grids "${GRIDS:-1,132,1632,2048}" --warps "${WARPS:-1,2,4}"
    ;;
  xla-ab)  # trace-shaped steps under each ';'-separated set of XLA flags, then without
    trace_ab xla "${FLAGSETS:?set FLAGSETS}"
    ;;
  decode-ab)  # decode steps at the trace's shape (17 rows of trace lengths), profiled: tunables and modes
    TAIL=24 run python3 -m bench.mixed_step "${trace_shape[@]}" --tag=-ab-base
    for split in ${SPLITS:-256 512}; do
      TAIL=6 run python3 -m bench.mixed_step "${trace_shape[@]}" --attention-tunables "{\"split_keys\": $split}" \
        --tag="-ab-split$split"
    done
    TAIL=6 run python3 -m bench.mixed_step "${trace_shape[@]}" --rows-in-place all --tag=-ab-rows-all
    step_hlo
    ;;
  fused)
    run python3 -m pytest -q -m gpu -x tests/test_lora_kernels.py
    TAIL=24 run python3 -m bench.kernels.lora --quick --out "$OUT/lora.json"
    TAIL=30 run python3 -m bench.decode_7b --impl auto --layer-loop unrolled --profile \
      --lora-tunables "$OUT/lora.json" --tag=-one-launch
    ;;
  lora)
    run python3 -m pytest -q -m gpu -x tests/test_lora_kernels.py
    TAIL=24 run python3 -m bench.kernels.lora --out "$OUT/lora.json"
    TAIL=30 run python3 -m bench.decode_7b --impl auto --layer-loop unrolled --profile \
      --lora-tunables "$OUT/lora.json" --tag=-tiers
    ;;
  slora-cublas)  # slora with XLA's cuBLAS GEMMs instead of its Triton GEMM fusions (decode-7b: 6.67 vs 6.85 ms base)
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" slora_trace
    ;;
  slora)  # RATE (default 8) offered at every n; CHUNK (default 256) prompt tokens per step; BATCH (32) rows
    # SMI=1: the GPU's clocks, power and clock-event reasons every 100 ms to $OUT/smi.csv (python -m
    # bench.clocks RESULT smi.csv lines the decode outliers up with them)
    if [ -n "${SMI:-}" ]; then
      fields=$(python3 -c 'import bench.clocks as c; print(c.SMI_FIELDS)')
      # newer drivers name the reasons clocks_event_reasons
      nvidia-smi --help-query-gpu | grep -q clocks_event_reasons.active && fields=${fields/throttle/event}
      # line-buffered, and stopped with SIGINT, so that no sample is left in a buffer
      TZ=UTC stdbuf -oL nvidia-smi --query-gpu="$fields" --format=csv,noheader,nounits -lms 100 > "$OUT/smi.csv" 2>&1 &
      smi_pid=$!
    fi
    slora_trace
    if [ -n "${SMI:-}" ]; then kill -INT "$smi_pid"; wait "$smi_pid"; fi
    ;;
  slora-rates)  # latency against offered rate at n = 100 (ranks 8..64): RATE first, then SWEEP
    TAIL=60 run timeout 560 python3 -m bench.slora "${slora_common[@]}" --n 100 --rate "${RATE:-12}" \
      --rate-sweep "${SWEEP:-4,8,16}" --duration 20 --batch 32 --chunk 256 --cold-warm 0
    ;;
  mixed)
    run python3 -m pytest -q -x tests/test_lora_kernels.py
    for m in on off; do TAIL=22 run python3 -m bench.mixed_step --mixed-steps $m --tag=-$m; done
    ;;
  cmdbuf)
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL" TAIL=30 \
      run python3 -m bench.decode_7b --impl auto --layer-loop unrolled --profile --tag=-cmdbuf
    ;;
  mg)
    geometry=${2:?mg needs a geometry: llama2-7b or llama2-70b}
    for mp in 4 2 1; do
      profile=--profile
      [ "$mp" = 1 ] && profile=
      run python3 -m bench.decode_7b --geometry "$geometry" --layers 32 --mp "$mp" --impl auto \
        --layer-loop unrolled $profile --skip-base --tag="-mg-$geometry-mp$mp"
    done
    ;;
  *)
    echo "usage: bash bench/device_runs.sh check | host | launch | launch-floor | fuse | kernels | fused | lora | slora | slora-rates | slora-cublas | mixed | mixed-ab | cmdbuf | mg GEOMETRY" >&2
    exit 2
    ;;
esac
