#!/usr/bin/env bash
# The next GPU check of issue 11 (bench/GPU_RESULTS.md, runs 7-8: the job's worker ran at
# 0.64-0.71x the bare pipeline on an H200, not yet explained), as one command of about five
# minutes on a lent machine:
#   1. the pipeline at batch 8 with its A/B of asynchronous / blocking host-to-device copies;
#   2. the job check profiled: where the launching thread's time goes, worker against bare;
#   3. the same without the profiler, output on /dev/shm (is it the disk?);
#   4. the same with blocking copies (what sdcore/devices.py changed, in the job).
# Usage there: bash bench/gpu_job_diagnosis.sh [WHEEL_DIR] [OUT_DIR] (wheels as gpu_check.sh says).
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="${1:-.whl}"
out="${2:-.}"
job=(--compile none --rows 192 --shard-size 96)
bash bench/gpu_check.sh "$wheels" -- --batches 8 --compile none --out "$out/gpu_check.md"
GPU_CHECK=bench/gpu_job_check.py bash bench/gpu_check.sh "$wheels" -- "${job[@]}" --profile --out "$out/job_profile.md"
GPU_CHECK=bench/gpu_job_check.py bash bench/gpu_check.sh "$wheels" -- "${job[@]}" --output-root /dev/shm \
  --out "$out/job_shm.md"
GPU_CHECK=bench/gpu_job_check.py bash bench/gpu_check.sh "$wheels" -- "${job[@]}" --blocking-copies \
  --out "$out/job_blocking.md"
