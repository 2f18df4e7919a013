#!/usr/bin/env bash
# Sets up .venv and runs the main job on the embedded toy model, offline, on the CPU:
# 1. generates images for a few prompts;
# 2. erases the concept "circle" with SalUn (toy preset; METHOD=esd-x etc. for another), writing the adapter,
#    a before/after grid and a report;
# 3. prints the judge's figures without and with the adapter: presence of "circle" on prompts that name it,
#    accuracy on prompts that do not.
# If the toy model is not in weights/, it is trained first with scripts/train_toy.py (about 90 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
export HF_HUB_OFFLINE=1
if [ ! -f weights/toy/model_index.json ] || [ ! -f weights/judge.safetensors ]; then
  echo "weights/toy is missing: training the toy model and its judge first (scripts/train_toy.py, about 90 minutes)"
  .venv/bin/python scripts/train_toy.py
fi
out="${1:-out/main}"
concept="${CONCEPT:-circle}"
method="${METHOD:-salun}"
mkdir -p "$out"
.venv/bin/unsee generate --model toy --out "$out/samples" --num-images 4 --seed 0 \
  --prompt "a red circle on a gray background" \
  --prompt "a striped blue star on a white background" \
  --prompt "a yellow heart on a black background"
.venv/bin/unsee erase --model toy --method "$method" --concept "$concept" --grid 8 --overwrite \
  --out "$out/$method-$concept.safetensors"
echo "== before erasing =="
.venv/bin/unsee eval --model toy --concept "$concept" --n 64 --json "$out/eval-before.json"
echo "== after erasing (adapter $out/$method-$concept.safetensors) =="
.venv/bin/unsee eval --model toy --concept "$concept" --n 64 --adapter "$out/$method-$concept.safetensors" \
  --json "$out/eval-after.json"
echo "images, adapter, before/after grid ($out/$method-$concept.grid.png) and figures in $out"
