#!/usr/bin/env bash
# Remake the toy world's weights in fusion_engine/toy/weights (seeded; CPU; see fusion_engine/toy/weights/CARD.md).
set -euo pipefail
python=${PYTHON:-python}
mkdir -p toy_logs
$python -m fusion_engine.toy.train_judges 2>&1 | tee toy_logs/judges.log
$python -m fusion_engine.toy.train_base 2>&1 | tee toy_logs/base.log
$python -m fusion_engine.toy.train_loras 2>&1 | tee toy_logs/loras.log
