#!/usr/bin/env bash
# Remake the toy world (seeded; CPU): judges, base model, the two LoRAs (in parallel, one thread each), then the
# validity gates, with the settings of the shipped files.
#   scripts/train_toy_world.sh [OUT]      (default: toy_weights, a local folder)
# Then copy the shipped files into the package:
#   cp OUT/{base_config.json,vae,unet,text_encoder,judge_clip,judge_dino}.* OUT/*_peft.safetensors \
#      OUT/*_kohya.safetensors OUT/gates.json fusion_engine/worlds/toy/weights/
# Recipe, seeds and measured times: fusion_engine/worlds/toy/weights/CARD.md. About 90 minutes on an idle
# 2-core CPU (judges ~10, base ~37, LoRAs ~44 side by side, gates ~5).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-toy_weights}
python=${PYTHON:-python}
mkdir -p "$out/logs"
# TOY_TRAIN_FIXED_THREADS: keep each trainer's --threads (two trainers of 2 threads on 2 cores run 10x slower)
export HF_HUB_OFFLINE=1 TOY_TRAIN_FIXED_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$python -m training.toy.train_judges --out "$out" 2>&1 | tee "$out/logs/judges.log"
$python -m training.toy.train_base --out "$out" --steps 1000 --threads 2 2>&1 | tee "$out/logs/base.log"
lora="$python -m training.toy.train_loras --out $out --threads 1"
$lora --only subject --targets attention+ff --rank 16 --steps 600 --lr 2e-3 > "$out/logs/lora_subject.log" 2>&1 &
$lora --only style --targets all --rank 32 --steps 4800 --lr 3e-3 --cosine --ema 0.999 > "$out/logs/lora_style.log" 2>&1 &
wait
$python -m training.toy.measure_gates --weights "$out" 2>&1 | tee "$out/logs/gates.log"
