#!/usr/bin/env bash
# Train the second toy world (issue 24; fusion_engine/worlds/toy/v2.py), seeded, CPU, in the order its gates
# need, then measure the gates fixed before training (training/toy/GATES_V2.md, gates_v2_spec.json).
#   scripts/train_toy_world_v2.sh OUT [STAGE]   STAGE: all (default: the five in order), base, judges, calibration,
#                                               loras, gates
# Each stage only reads what the earlier ones wrote to OUT; the base's calibration needs only the base, so it runs
# before the LoRAs. A base already trained with these steps (OUT/times_base.json: copied in, or from an earlier
# call) is kept, and so are judges trained with these steps. Rerunning the script on the same OUT continues where it
# stopped: the base UNet and each LoRA write a resume state every 400 steps (OUT/checkpoint-<step>/ and
# OUT/checkpoint-<subject|style>-<step>/resume_state.pt, the newest two kept; training/toy/resume.py), and a stage
# passes --resume to its trainer when OUT holds one (the base also when OUT/vae_only/ holds a finished VAE), which
# then ends with the same weights as a run never stopped. Each calibration written after the base, the kept gates'
# JSON written after the base and LoRAs, and gate 8's eval rows (OUT/fusion_gate) are kept; gate 7 is sampled
# again. Rerun with the same SMOKE setting: a resume with other arguments is refused.
#
# Time, estimated from the first world's measured per-step times on this 2-core CPU (weights/CARD.md: UNet 2.19
# s/step at batch 32 on 2 threads, a LoRA 0.55 s/step on 1 thread, judges 10 min, VAE 3 min, ~0.8 s of CPU per
# 32x32 image sampled and measured), idle -> shared with other sessions (2-3x):
#   base   judges 4 + VAE 3 + UNet 4800 steps ~1.4 s/step 112 min   ~ 2 h idle     -> 4-6 h shared
#   loras  subject and style side by side, 4800 steps each      ~ 36 min idle   -> 1.2-2 h shared
#   gates  calibration 1600 images, subject composition 200,
#          the five kept gates 500, fusion at 1:1 300 (+ the
#          scale grid 800 only if 1:1 reaches no 30%)            ~ 45-60 min idle -> 1.5-3 h shared
# (run 2's steps, gates_v2_spec.json "runs"; run 1 measured 1.4 s per UNet step and 0.45 s per LoRA step idle.)
# In all about 3.5-4 h idle: more than one 3-hour session, so the stages resume (above). Start `base` first thing, in the
# background, at normal priority with everything else at nice 19.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/train_toy_world_v2.sh OUT [all|base|judges|calibration|loras|gates]}
stage=${2:-all}
case $stage in all|base|judges|calibration|loras|gates) ;;
  *) echo "unknown stage '$stage': all, base, judges, calibration, loras or gates" >&2; exit 2 ;; esac
python=${PYTHON:-python}
mkdir -p "$out/logs"
# TOY_TRAIN_FIXED_THREADS: keep each trainer's --threads (two trainers of 2 threads on 2 cores run 10x slower)
export HF_HUB_OFFLINE=1 TOY_TRAIN_FIXED_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stamp() { date -u +%FT%TZ; }
# has PATTERN: OUT holds a file matching PATTERN (a resume state)
has() { compgen -G "$out/$1" > /dev/null; }
# SMOKE=1: a few steps of everything (proves the script runs; its files are not a world). The numbers of a real
# run are the spec's (gates_v2_spec.json) and are not to be changed.
if [[ ${SMOKE:-0} == 1 ]]; then
  base_steps=20 vae_steps=5 judge_steps=3 lora_steps=20 seeds=1 sampler="--steps 4" gate_seeds=2 \
    v2_flags="--subject-seeds 1 --fusion-seeds 1 --steps 2"
else
  base_steps=4800 vae_steps=400 judge_steps=600 lora_steps=4800 seeds=20 sampler="" gate_seeds=100 v2_flags=""
fi

# done FILE: FILE was written (each tool writes its JSON last) after the base, or with LORAS after the LoRAs too, so a
# stage stopped by the end of a session keeps its finished steps when rerun
done_() {
  local file=$out/$1 weights=(unet.safetensors text_encoder.safetensors vae.safetensors)
  [[ ${2:-} == loras ]] && weights+=(style_zzt_kohya.safetensors subject_sks_mushroom_peft.safetensors)
  [[ -s $file ]] || return 1
  for weight in "${weights[@]}"; do [[ $file -nt $out/$weight ]] || return 1; done
}

if [[ $stage == all || $stage == base ]]; then
  if grep -qs "\"steps\": $base_steps, \"stop_after\": null" "$out/times_base.json"; then
    echo "$(stamp) base already trained ($out/times_base.json): kept" >> "$out/logs/times.txt"
  else
    resume="" tee_flag=""
    if has "checkpoint-[0-9]*/resume_state.pt" || has "vae_only/train_args.json"; then
      resume="--resume" tee_flag="-a"
    fi
    echo "$(stamp) base start $resume" >> "$out/logs/times.txt"
    $python -m training.toy.train_base --world v2 --out "$out" --steps $base_steps --vae-steps $vae_steps --batch 32 \
      --threads 2 $resume 2>&1 | tee $tee_flag "$out/logs/base.log"
    echo "$(stamp) base done" >> "$out/logs/times.txt"
  fi
fi

if [[ $stage == all || $stage == judges ]]; then
  if grep -qs "\"steps\": $judge_steps}" "$out/times_judges.json"; then
    echo "judges already trained ($out/times_judges.json): kept"
  else
    echo "$(stamp) judges start" >> "$out/logs/times.txt"
    $python -m training.toy.train_judges --world v2 --out "$out" --steps $judge_steps --threads 2 \
      2>&1 | tee "$out/logs/judges.log"
    echo "$(stamp) judges done" >> "$out/logs/times.txt"
  fi
fi

if [[ $stage == all || $stage == calibration ]]; then
  # the base alone on its own images of seen combinations, then of the held-out ones (base composition)
  for combos in seen held; do
    if done_ "calibration_$combos.json"; then echo "$(stamp) calibration_$combos.json kept" >> "$out/logs/times.txt"
      continue; fi
    echo "$(stamp) calibration $combos start" >> "$out/logs/times.txt"
    $python -m training.toy.calibrate --world v2 --weights "$out" --combos $combos --seeds $seeds $sampler \
      --threads 2 --out "$out/calibration_$combos.json" 2>&1 | tee "$out/logs/calibration_$combos.log"
  done
  echo "$(stamp) calibration done" >> "$out/logs/times.txt"
fi

if [[ $stage == all || $stage == loras ]]; then
  # One recipe for both LoRAs (gates_v2_spec.json "lora_recipe"): same rank, alpha, targets, steps, schedule, EMA,
  # batch and prior share; only their data and seeds differ. Side by side, one thread each.
  echo "$(stamp) loras start" >> "$out/logs/times.txt"
  lora="$python -m training.toy.train_loras --world v2 --out $out --threads 1 --targets attention+ff --rank 32 \
    --alpha 16 --steps $lora_steps --lr 3e-3 --cosine --ema 0.999 --batch 8 --prior-share 0.25"
  # each LoRA resumes from its own newest state, if it has one (its log appended to)
  for role in subject style; do
    if has "checkpoint-$role-[0-9]*/resume_state.pt"; then
      echo "$(stamp) $role resumes" >> "$out/logs/times.txt"
      $lora --only $role --resume >> "$out/logs/lora_$role.log" 2>&1 &
    else
      $lora --only $role > "$out/logs/lora_$role.log" 2>&1 &
    fi
    eval "$role=\$!"
  done
  wait $subject
  wait $style
  $python -m training.toy.lora_norms --weights "$out" --out "$out/lora_norms.json" --markdown "$out/lora_norms.md"
  echo "$(stamp) loras done" >> "$out/logs/times.txt"
fi

if [[ $stage == all || $stage == gates ]]; then
  echo "$(stamp) gates start" >> "$out/logs/times.txt"
  for combos in seen held; do  # gates 6 and 7 read the calibration
    done_ "calibration_$combos.json" || { echo "no calibration_$combos.json newer than the base in $out: run the" \
      "calibration stage first" >&2; exit 2; }
  done
  # 1. the five kept gates (their measure_gates run; the base under the subject and style prompts too)
  if done_ gates.json loras; then echo "$(stamp) gates.json kept" >> "$out/logs/times.txt"; else
    $python -m training.toy.measure_gates --weights "$out" --seeds $gate_seeds --all-base --threads 2 \
      2>&1 | tee "$out/logs/gates.log" || true
  fi
  # 2. the new gates: base and subject composition, fusion reachable (full strength; the spec's scale grid only
  #    if no policy reaches 30%; the best cell again on fresh seeds), symmetric LoRAs -> OUT/gates_v2.json
  $python -m training.toy.measure_gates_v2 --weights "$out" $v2_flags --threads 2 2>&1 | tee "$out/logs/gates_v2.log" \
    || true
  echo "$(stamp) gates done" >> "$out/logs/times.txt"
fi
