#!/usr/bin/env bash
# The next GPU check of issue 11 (bench/GPU_RESULTS.md, runs 7-8: the job's worker ran at
# 0.64-0.71x the bare pipeline on an H200, not yet explained), as one command of about six
# minutes on a lent machine:
#   1. the job check in the default CUDA mode (cuda-graphs), then its variants round-robin, each
#      one change to the worker (bench/gpu_job_check.py VARIANTS: the in-flight note as before,
#      no PNG encoding, encoding in processes, no non-finite checks, output on /dev/shm, blocking
#      copies), with py-spy sampling the plain job's passes (every thread, then the GIL holder);
#   2. the pipeline against diffusers at batch 8 with its A/B of asynchronous / blocking copies.
# Usage there: bash bench/gpu_job_diagnosis.sh [WHEEL_DIR] [OUT_DIR] (wheels as gpu_check.sh
# says, plus py-spy's, which gives the py-spy binary).
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="${1:-.whl}"
out="${2:-.}"
variants=job,job-cold,prompts-cold,images-cold
GPU_CHECK=bench/gpu_job_check.py bash bench/gpu_check.sh "$wheels" -- --compile cuda-graphs --rows 256 \
  --shard-size 64 --variants "$variants" --rounds 2 --py-spy "$out" --out "$out/job_variants.md"
