#!/usr/bin/env bash
# Train the second toy world (issue 24; fusion_engine/worlds/toy/v2.py), seeded, CPU, in the order its gates
# need, then measure the gates fixed before training (training/toy/GATES_V2.md, gates_v2_spec.json).
#   scripts/train_toy_world_v2.sh OUT [STAGE]     STAGE: all (default), base, loras, gates
# Each stage only reads what the earlier ones wrote to OUT, so a session that ends mid-way can go on with the
# next stage (a stage cut short is rerun whole: the trainers do not resume).
#
# Time, estimated from the first world's measured per-step times on this 2-core CPU (weights/CARD.md: UNet 2.19
# s/step at batch 32 on 2 threads, a LoRA 0.55 s/step on 1 thread, judges 10 min, VAE 3 min, ~0.8 s of CPU per
# 32x32 image sampled and measured), idle -> shared with other sessions (2-3x):
#   base   judges 10 + VAE 3 + UNet 1200 steps 44 min          ~ 57 min idle   -> 2.0-2.9 h shared
#   loras  subject and style side by side, 2400 steps each      ~ 22 min idle   -> 45-70 min shared
#   gates  calibration 1600 images, subject composition 200,
#          the five kept gates 500, fusion at 1:1 300 (+ the
#          scale grid 800 only if 1:1 reaches no 30%)            ~ 45-60 min idle -> 1.5-3 h shared
# In all about 2-2.3 h idle, 4-7 h shared: more than one 3-hour session. Start `base` first thing, in the
# background, at normal priority with everything else at nice 19.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/train_toy_world_v2.sh OUT [all|base|loras|gates]}
stage=${2:-all}
python=${PYTHON:-python}
mkdir -p "$out/logs"
# TOY_TRAIN_FIXED_THREADS: keep each trainer's --threads (two trainers of 2 threads on 2 cores run 10x slower)
export HF_HUB_OFFLINE=1 TOY_TRAIN_FIXED_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stamp() { date -u +%FT%TZ; }

if [[ $stage == all || $stage == base ]]; then
  echo "$(stamp) base start" >> "$out/logs/times.txt"
  $python -m training.toy.train_base --world v2 --out "$out" --steps 1200 --batch 32 --threads 2 \
    2>&1 | tee "$out/logs/base.log"
  $python -m training.toy.train_judges --world v2 --out "$out" --threads 2 2>&1 | tee "$out/logs/judges.log"
  echo "$(stamp) base done" >> "$out/logs/times.txt"
fi

if [[ $stage == all || $stage == loras ]]; then
  # One recipe for both LoRAs (gates_v2_spec.json "lora_recipe"): same rank, alpha, targets, steps, schedule, EMA,
  # batch and prior share; only their data and seeds differ. Side by side, one thread each.
  echo "$(stamp) loras start" >> "$out/logs/times.txt"
  lora="$python -m training.toy.train_loras --world v2 --out $out --threads 1 --targets attention+ff --rank 32 \
    --alpha 16 --steps 2400 --lr 3e-3 --cosine --ema 0.999 --batch 8 --prior-share 0.25"
  $lora --only subject > "$out/logs/lora_subject.log" 2>&1 &
  subject=$!
  $lora --only style > "$out/logs/lora_style.log" 2>&1 &
  style=$!
  wait $subject
  wait $style
  $python -m training.toy.lora_norms --weights "$out" --out "$out/lora_norms.json" --markdown "$out/lora_norms.md"
  echo "$(stamp) loras done" >> "$out/logs/times.txt"
fi

if [[ $stage == all || $stage == gates ]]; then
  echo "$(stamp) gates start" >> "$out/logs/times.txt"
  # 1. calibration on the base's own images of seen combinations, then the held-out ones (base composition)
  $python -m training.toy.calibrate --world v2 --weights "$out" --combos seen --seeds 20 --threads 2 \
    --out "$out/calibration_seen.json" 2>&1 | tee "$out/logs/calibration_seen.log"
  $python -m training.toy.calibrate --world v2 --weights "$out" --combos held --seeds 20 --threads 2 \
    --out "$out/calibration_held.json" 2>&1 | tee "$out/logs/calibration_held.log"
  # 2. the five kept gates (their measure_gates run; the base under the subject and style prompts too)
  $python -m training.toy.measure_gates --weights "$out" --all-base --threads 2 2>&1 | tee "$out/logs/gates.log" || true
  # 3. the new gates: base and subject composition, fusion reachable (full strength; the spec's scale grid only
  #    if no policy reaches 30%; the best cell again on fresh seeds), symmetric LoRAs -> OUT/gates_v2.json
  $python -m training.toy.measure_gates_v2 --weights "$out" --threads 2 2>&1 | tee "$out/logs/gates_v2.log" || true
  echo "$(stamp) gates done" >> "$out/logs/times.txt"
fi
