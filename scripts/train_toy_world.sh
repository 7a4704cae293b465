#!/usr/bin/env bash
# Remake the toy world (seeded; CPU): judges, base model, the two LoRAs, then the validity gates, with the
# settings of the shipped files (the base stops at step 400 of a 1000-step schedule: see the card).
#   scripts/train_toy_world.sh [OUT]      (default: toy_weights, a local folder)
# Then copy the shipped files into the package:
#   cp OUT/{base_config.json,vae,unet,text_encoder,judge_clip,judge_dino}.* OUT/*_peft.safetensors \
#      OUT/*_kohya.safetensors OUT/gates.json fusion_engine/worlds/toy/weights/
# Recipe, seeds and measured times: fusion_engine/worlds/toy/weights/CARD.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-toy_weights}
python=${PYTHON:-python}
mkdir -p "$out/logs"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$python -m training.toy.train_judges --out "$out" 2>&1 | tee "$out/logs/judges.log"
$python -m training.toy.train_base --out "$out" --steps 1000 --stop-after 400 2>&1 | tee "$out/logs/base.log"
$python -m training.toy.train_loras --out "$out" --steps 300 2>&1 | tee "$out/logs/loras.log"
$python -m training.toy.measure_gates --weights "$out" 2>&1 | tee "$out/logs/gates.log"
