#!/usr/bin/env bash
# Sets up .venv and runs the main job on the embedded toy model, offline, on the CPU:
# generates images for a few prompts and prints the judge's figures.
# (Erasing a concept joins this job with the erasure issue.)
# If the toy model is not in weights/ yet, it is trained first with scripts/train_toy.py (about 90 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
export HF_HUB_OFFLINE=1
if [ ! -f weights/toy/model_index.json ] || [ ! -f weights/judge.safetensors ]; then
  echo "weights/toy is missing: training the toy model and its judge first (scripts/train_toy.py, about 90 minutes)"
  .venv/bin/python scripts/train_toy.py
fi
out="${1:-out/main}"
.venv/bin/unsee generate --model toy --out "$out" --num-images 4 --seed 0 \
  --prompt "a red circle on a gray background" \
  --prompt "a striped blue star on a white background" \
  --prompt "a yellow heart on a black background"
.venv/bin/unsee eval --model toy --concept circle --n 32 --json "$out/eval.json"
echo "images and figures in $out"
