#!/usr/bin/env bash
# Stage 2 of full-size Qwen-Image LoRA r32 at 1024^2 (gradient checkpointing, bf16) through
# `autosplit run`, uncapped and under VRAM caps of 48, 24, 16 and 12 GiB, each with
# `--vram_budget CAP --blocks_to_swap auto` (issue 11, docs/memory.md). Results: $OUT/results.json
# (bench/gpu/memory_placement.py collect), $OUT/bandwidth.json, $OUT/runs.log.
#
#   bash bench/gpu/memory_placement.sh              # GPU host, ~8 min (wheels in .gpuwheels)
#   PART=2 bash bench/gpu/memory_placement.sh       # bit-for-bit swap vs none, fp8 output and loss, timing
#   PART=compile [BEFORE=DIR] bash bench/gpu/memory_placement.sh  # step speed: before, eager, compiled (issue 16)
#   PART=validation bash bench/gpu/memory_placement.sh  # validation images under a 48 GiB cap (issue 13)
#   SMOKE=1 bash bench/gpu/memory_placement.sh      # a small folder on the CPU, here
set -uo pipefail
OUT=${OUT:-/tmp/memory_placement_out}
mkdir -p "$OUT"
SHM=${SHM:-/dev/shm/autosplit-mp}
rm -rf "$SHM" /tmp/mp-runs /tmp/mp-data
mkdir -p /tmp/mp-runs
if [ -d .gpuwheels ] && [ -z "${SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpuwheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
export AUTOSPLIT_HOME=/tmp/mp-home TQDM_DISABLE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
STEPS=${STEPS:-5}
IMAGE=1024
if [ -n "${SMOKE:-}" ]; then IMAGE=64; fi
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/runs.log"; }

say "build"
$PY bench/gpu/memory_placement.py build "$SHM/qwen" ${SMOKE:+--small} 2>&1 | tee -a "$OUT/runs.log" || exit 1
$PY bench/gpu/memory_placement.py dataset /tmp/mp-data --size $IMAGE 2>&1 | tail -2
if [ -z "${SMOKE:-}" ]; then $PY bench/gpu/memory_placement.py bandwidth "$OUT/bandwidth.json" 2>&1 | tee -a "$OUT/runs.log"; fi
# eager with cuDNN attention off, as issue 11's runs were measured (train.compile defaults to auto
# since issue 16); the compile part's runs override these (a later --set wins)
COMMON=(--model_paths "$SHM/qwen" --dataset_base_path /tmp/mp-data --use_gradient_checkpointing --lora_rank 32
        --seed 0 --max_steps "$STEPS" --dataset_repeat 8 --set data.num_workers=1
        --set train.compile=none --set train.cudnn_attention=false)
say "stage 1"
$PY -m autosplit run --task sft:data_process --output_path "$SHM/cache" "${COMMON[@]}" > /tmp/mp-runs/stage1.txt 2>&1
tail -3 /tmp/mp-runs/stage1.txt | tee -a "$OUT/runs.log"

run() {  # NAME CAP_GIB [autosplit flags]: one stage-2 run under a cap (empty: uncapped)
  local name=$1 cap=$2; shift 2
  say "run $name (cap ${cap:-none}) $*"
  # CUBLAS_WORKSPACE_CONFIG only with DET: set but empty, torch warns at every cuBLAS call
  AUTOSPLIT_GPU_CAP_GIB=$cap AUTOSPLIT_DETERMINISTIC=${DET:-} PYTHONPATH=$PWD/bench/gpu/cap:${PYTHONPATH:-$PWD} \
  env ${DET:+CUBLAS_WORKSPACE_CONFIG=:4096:8} timeout "${RUN_TIMEOUT:-170}" \
    $PY -m autosplit run --cache_path "$SHM/cache" --output_path "/tmp/mp-runs/$name" "${COMMON[@]}" "$@" \
    > "/tmp/mp-runs/$name.log" 2>&1
  echo "exit $?" >> "/tmp/mp-runs/$name.log"
  grep -E "placement|budget|stage 2 stats|validation|error|exit" "/tmp/mp-runs/$name.log" | tee -a "$OUT/runs.log"
  $PY bench/gpu/memory_placement.py collect /tmp/mp-runs "$OUT/results.json" ${BASE:-} > /dev/null 2>&1
}

BASE=
if [ -n "${SMOKE:-}" ]; then
  run 0-uncapped "" ; run 1-swap3 "" --blocks_to_swap 3 ; run 2-budget "" --vram_budget 1 --blocks_to_swap auto
  if [ "${PART:-1}" = 2 ]; then
    $PY bench/gpu/memory_placement.py fp8diff "$SHM/qwen" "$OUT/fp8_difference.json" 2>&1 | tail -1
    DET=1 run 3-det "" --blocks_to_swap 2; run 4-fp8 "" --base_precision fp8
  fi
elif [ "${PART:-1}" = validation ]; then
  # validation images during stage 2 under a 48 GiB cap (issue 13): where the decoder runs, a round's cost
  VAL=(--validation_prompt "a photo of a red fox in a snowy forest, golden hour"
       --validation_prompt "a watercolor painting of a lighthouse on a cliff" --validation_steps 5)
  run 0-val-cap48 48 --vram_budget 48 --blocks_to_swap auto "${VAL[@]}"
  run 1-val-cap48-cpu-decoder 48 --vram_budget 48 --blocks_to_swap auto "${VAL[@]}" --set train.validation_decoder_device=cpu
  mkdir -p "$OUT/samples" && cp /tmp/mp-runs/0-val-cap48/samples/step-10/00.png "$OUT/samples/step10-00.png" 2>/dev/null
elif [ "${PART:-1}" = compile ]; then
  # the training step's speed through `autosplit run` (issue 16), STEPS each (20 for the loss
  # curves): BEFORE=DIR runs DIR's autosplit package first (the code before issue 16's changes:
  # Qwen-Image's all-ones text mask passed, flash attention impossible), then today's code eager,
  # compiled (train.compile=blocks), compiled with cuDNN attention, and compiled under a 48 GiB cap
  # with the planner's prediction judged (QUICK=1: eager and compiled with cuDNN only). PYTHONSAFEPATH
  # keeps the working directory off sys.path, so PYTHONPATH decides which autosplit runs
  export PYTHONSAFEPATH=1
  if [ -n "${BEFORE:-}" ]; then PYTHONPATH=$BEFORE:${PYTHONPATH:-} run 0-before ""; fi
  run 1-eager ""
  if [ -z "${QUICK:-}" ]; then run 2-compiled "" --set train.compile=blocks; fi
  run 3-compiled-cudnn "" --set train.compile=blocks --set train.cudnn_attention=true
  if [ -z "${QUICK:-}" ]; then run 4-compiled-cap48 48 --vram_budget 48 --set train.compile=blocks; fi
elif [ "${PART:-1}" = 2 ]; then
  BASE=--base=f-uncapped
  # bit-for-bit: deterministic algorithms on, unswapped vs 47 blocks swapped; fp8: output and loss
  $PY bench/gpu/memory_placement.py fp8diff "$SHM/qwen" "$OUT/fp8_difference.json" 2>&1 | tee -a "$OUT/runs.log"
  DET=1 run a-det-uncapped ""
  DET=1 run b-det-cap16 16 --vram_budget 16 --blocks_to_swap auto
  if ! grep -q "$(grep -o '"weights_sha256": "[0-9a-f]*' /tmp/mp-runs/a-det-uncapped.log)" /tmp/mp-runs/b-det-cap16.log; then
    DET=1 run c-det-uncapped-again ""
  fi
  run d-fp8-uncapped "" --base_precision fp8
  run e-auto-cap12 12 --vram_budget 12 --blocks_to_swap auto --base_precision auto
  run f-uncapped ""
  run g-cap24 24 --vram_budget 24 --blocks_to_swap auto
else
  run 0-uncapped ""
  run 2-cap24 24 --vram_budget 24 --blocks_to_swap auto
  run 3-cap16 16 --vram_budget 16 --blocks_to_swap auto
  run 1-cap48 48 --vram_budget 48 --blocks_to_swap auto
  run 4-cap12 12 --vram_budget 12 --blocks_to_swap auto
  run 5-cap24-noswap 24 --vram_budget 24
fi
$PY bench/gpu/memory_placement.py collect /tmp/mp-runs "$OUT/results.json" $BASE 2>&1 | tee -a "$OUT/runs.log"
say "done"
rm -rf "$SHM"
