#!/usr/bin/env bash
# Multi-GPU benchmark (issue 6) on a host with 2 GPUs, after autosplit and its wheels are installed:
#   bash bench/gpu/multi_gpu.sh                 # mid size, ~5-7 min, results in $OUT
#   bash bench/gpu/multi_gpu.sh --cpu --size tiny  # check the script on CPU (gloo), ~2 min
# Extra arguments go to bench/gpu/multi_gpu.py (--size, --budget-s, --num-samples, ...).
set -euo pipefail
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"  # NVLink multicast stays off
OUT="${OUT:-$PWD/bench-out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
python3 -c "import autosplit, diffusers, peft, zarr, tensorstore, accelerate, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'GPUs')"
exec python3 bench/gpu/multi_gpu.py --out "$OUT" "$@"
