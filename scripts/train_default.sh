#!/usr/bin/env bash
# Reproducible recipe for the shipped default ACVTT model (acvtt_core/weights/default.*).
# 1) fetch the sample data (checksummed, cached under var/sample-data);
# 2) one training command: stage 1 on in-plane self-supervision + synthetic z, x2..x5, decimation +
#    slab averaging, one factor-conditioned compact model, 1 thread (THREADS=2 on an idle box),
#    wall-clock budget;
# 3) evaluation on the held-out patients with `acvtt eval` (see docs/MODEL.md).
# Runs in the background with nohup; logs under runs/ (git-ignored). Resumable: rerun to continue.
#   scripts/train_default.sh [OUT_DIR] [BUDGET_MIN]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/default}
BUDGET=${2:-55}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
"$PY" -m dicom_node.sample_data > "$OUT/sample_data.json"
D=var/sample-data/volumes
# Held out (whole patients, never trained on): lung2 (5 mm chest), abdomen_ct (3 mm abdomen/pelvis)
# and the abdomen DICOM series ct_dicom_repaired (possibly the same patient as abdomen_ct).
nohup "$PY" -m acvtt_core.cli train-selfsup --out "$OUT" --preset compact --factors 2,3,4,5 \
  --source "$D/chest_cta_thin.nii.gz:iz:1" \
  --source "$D/lung1_image.nrrd:iz:1" \
  --source "$D/spine_ct.nii.gz:z:0.3" \
  --held-out lung2_image --held-out abdomen_ct --held-out ct_dicom_repaired \
  --budget-min "$BUDGET" --steps 20000 --batch-size 4 --crop 128 \
  --lr 1e-3 --p-slab 0.4 --init he --loss mse --threads "${THREADS:-1}" \
  >> "$OUT/train.log" 2>&1 &
echo "training in the background: pid $! log $OUT/train.log"
