#!/usr/bin/env bash
# The ONE prepared command for a lent GPU (issue 22): checks the image, installs the wheelhouse, runs
# bench/gpu_e2e.py and bench/gpu_table.py under timeouts, and tees every raw output into one results folder.
#
# Here, once (needs the index; see scripts/build_wheelhouse.sh):
#   PYTHON_VERSIONS=3.11 scripts/build_wheelhouse.sh      # the GPU image's Python (a cheap first check: `python -V`)
# Then through the device tool (carry the ignored wheelhouse):
#   run(command="bash bench/gpu_run.sh", carry=["wheelhouse"], timeout_s=420)
# On the device, $OUT is the folder that comes back: the results go to $OUT/results/<date>-<card>/ there (copy them
# to bench/results/ here and commit at once: raw logs lost with a machine are lost for good); without $OUT they go
# to bench/results/<date>-<card>/.
#
# Time limits (seconds, override by environment): INSTALL_S=60, LLR_S=40 (gpu_e2e's last rows: one whole
# FusionPipeline call per model, fls alone and fls + LLR; 0 skips them), E2E_S=150+LLR_S (gpu_e2e stops starting
# denoiser rows 45 + LLR_S s before it and pipeline rows 45 s before it), TABLE_S=70 (gpu_table's layer tables; cut
# short, its printed rows stay), POOL_S=50 (gpu_table's pool table: the pooled kernels' variants, hoisted shrink with
# the fused and the cuBLAS base, per-slot ranks, pooled mix, beside the pair kernel and the merged F.linear),
# INDUCTOR_S=45 (gpu_table's Inductor table: the reference op compiled per shape beside the fused ops; it starts no
# shape past 25 s): 6.9 min at most, so a 15-minute loan holds the start (2-3 min), this run and a rerun. Rows are in
# order of value within each step, so what a short limit cuts is the least needed. Each step runs whatever the one
# before did.
set -uo pipefail
cd "$(dirname "$0")/.."
INSTALL_S="${INSTALL_S:-60}"
LLR_S="${LLR_S:-40}"
E2E_S="${E2E_S:-$((150 + LLR_S))}"
POOL_S="${POOL_S:-50}"
INDUCTOR_S="${INDUCTOR_S:-45}"
TABLE_S="${TABLE_S:-70}"
PY="${PY:-python}"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' /' '--')
stamp="$(date -u +%Y-%m-%d-%H%M)-${card:-nogpu}"
if [ -n "${OUT:-}" ]; then DEST="$OUT/results/$stamp"; else DEST="bench/results/$stamp"; fi
mkdir -p "$DEST"
echo "results: $DEST"

{
  date -u
  git rev-parse --short HEAD 2>/dev/null || echo "commit: unknown (no .git here)"
  "$PY" -V
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import numpy; print('numpy', numpy.__version__, '(on the image)')" 2>&1 | tail -1
} 2>&1 | tee "$DEST/env.txt"

# wheels for this Python? (binary wheels carry cpXY tags; the wheelhouse is built for one version)
tag=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
if [ ! -f wheelhouse/requirements.txt ]; then
  echo "no wheelhouse/ (carry it: run(..., carry=[\"wheelhouse\"])); gpu_e2e.py needs diffusers" | tee -a "$DEST/env.txt"
elif ! ls wheelhouse/ | grep -q -- "-$tag-"; then
  echo "wheelhouse has no $tag wheels: rebuild with PYTHON_VERSIONS=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
    | tee -a "$DEST/env.txt"
else
  timeout "$INSTALL_S" "$PY" -m pip install --no-index --no-deps --find-links wheelhouse \
    -r wheelhouse/requirements.txt 2>&1 | tail -5 | tee "$DEST/pip.txt"
fi

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
echo "== gpu_e2e.py (timeout ${E2E_S}s)"
timeout "$E2E_S" "$PY" bench/gpu_e2e.py --out-dir "$DEST" --budget-s $((E2E_S - 45 - LLR_S)) \
  --llr-budget-s "$LLR_S" --reps 3 2>&1 | tee "$DEST/gpu_e2e.txt"
echo "gpu_e2e exit ${PIPESTATUS[0]}" | tee -a "$DEST/gpu_e2e.txt"

echo "== gpu_table.py --tables sdxl flux (timeout ${TABLE_S}s)"
timeout "$TABLE_S" "$PY" bench/gpu_table.py --tables sdxl flux 2>&1 | tee "$DEST/gpu_table.txt"
echo "gpu_table exit ${PIPESTATUS[0]}" | tee -a "$DEST/gpu_table.txt"

echo "== gpu_table.py --tables pool (timeout ${POOL_S}s)"
timeout "$POOL_S" "$PY" bench/gpu_table.py --tables pool 2>&1 | tee "$DEST/gpu_pool.txt"
echo "gpu_table pool exit ${PIPESTATUS[0]}" | tee -a "$DEST/gpu_pool.txt"

echo "== gpu_table.py --tables inductor (timeout ${INDUCTOR_S}s)"
timeout "$INDUCTOR_S" "$PY" bench/gpu_table.py --tables inductor --inductor-budget-s $((INDUCTOR_S - 20)) 2>&1 \
  | tee "$DEST/gpu_inductor.txt"
echo "gpu_table inductor exit ${PIPESTATUS[0]}" | tee -a "$DEST/gpu_inductor.txt"
ls -la "$DEST"
