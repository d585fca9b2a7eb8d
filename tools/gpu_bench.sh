#!/usr/bin/env bash
# The accelerator benchmark: distilgpt2, gpt2 and gpt2-medium at 64 pairs x 512 tokens in bfloat16 (float32
# master weights), DPO with a frozen reference, DPO with precomputed reference log-probs and DPO-Convex; prints
# tools/bench_train.py's table and the projected SHP epoch (SHP's length profile, real tokens only).
# About 6 minutes on one H200.
#
#   bash tools/gpu_bench.sh [OUT_DIR]          # writes OUT_DIR/gpu_bench.json and OUT_DIR/gpu_bench_shp.json
#   BENCH_TOY=1 bash tools/gpu_bench.sh OUT    # the same script at a toy size, to check it on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
mkdir -p "$out"
if [[ "${BENCH_TOY:-0}" == 1 ]]; then
  models=tiny; size=(--batch=2 --length=32 --steps=2 --warmup=1 --max_length=32 --max_prompt_length=16)
  dtype=float32
else
  models=distilgpt2,gpt2,gpt2-medium; size=(--batch=64 --length=512 --steps=5 --warmup=2)
  dtype=bfloat16
fi
methods=dpo,dpo_precomputed,dpo_convex
python tools/bench_train.py --model=$models --method=$methods --dtype=$dtype "${size[@]}" --json="$out/gpu_bench.json"
python tools/bench_train.py --model=$models --method=$methods --dtype=$dtype "${size[@]}" --data=shp \
  --json="$out/gpu_bench_shp.json"
