#!/usr/bin/env bash
# The next GPU check of issue 11, as one command of about seven minutes on a lent machine.
# Runs 9-10 (bench/GPU_RESULTS.md) found the job's worker at 0.82-0.87x the bare pipeline on rows
# it had not seen (0.95-1.01x on rows seen before), the GPU idle after every VAE decode's read.
# Since then a decode's images are given out two UNet forwards after it (sdcore.pipeline
# GIVE_OUT_LAG), the copies to the device skip pin_memory(), and a lane starts the next batch's
# rows (prompts encoded) a few per forward while the batch before runs (PREPARE_AHEAD); this
# measures all three:
#   1. the job check in the default CUDA mode (cuda-graphs): its steady shards against the bare
#      pipeline, reproduce in the process and in a new one, then variants round-robin
#      (bench/gpu_job_check.py VARIANTS: caches emptied first as in a job, the same with rows
#      started as their slots free up as before, each decode given out at once as before,
#      blocking copies, caches warm), py-spy sampling every thread;
#   2. the pipeline against diffusers at batch 8, with the A/B of asynchronous / blocking copies.
# Usage there: bash bench/gpu_job_diagnosis.sh [WHEEL_DIR] [OUT_DIR] (wheels as gpu_check.sh
# says, plus py-spy's, which gives the py-spy binary).
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="${1:-.whl}"
out="${2:-.}"
variants=job-cold,start-in-slot-cold,give-out-now,blocking-copies,job
GPU_CHECK=bench/gpu_job_check.py bash bench/gpu_check.sh "$wheels" -- --compile cuda-graphs --rows 256 \
  --shard-size 64 --variants "$variants" --rounds 2 --py-spy "$out" --out "$out/job_variants.md"
bash bench/gpu_check.sh "$wheels" -- --batches 8 --compile none --out "$out/gpu_check.md"
