#!/usr/bin/env bash
# Reproducible recipe for the shipped default ACVTT model (acvtt_core/weights/default.*).
# 1) fetch the sample data (checksummed, cached under var/sample-data);
# 2) train stage 1 on in-plane self-supervision + synthetic z, x2..x5, decimation + slab
#    averaging, one factor-conditioned compact model, 1 thread, in the three wall-clock phases that
#    made the shipped weights (176 CPU-minutes on one core of the 2-core CPU machine):
#      A  28 min, lr 1e-3 (then 2.5e-4 for the last quarter), at most 20,000 steps
#      B  30 min, resumed, same settings (lr 2.5e-4 past step 15,000)
#      C 118 min, resumed, lr 5e-4 (then 1.25e-4 for the last quarter), at most 70,000 steps
#      D  50 min, C's weights + the Alderson phantom, fresh Adam, lr 2.5e-4 (36 min), 6.25e-5 (14):
#         issue 15's candidate, NOT in the shipped weights (docs/MODEL.md, "More body regions")
# 3) evaluate on the held-out patients with `acvtt eval` (see docs/MODEL.md).
# Runs in the background with nohup; logs under OUT (git-ignored runs/ by default). Resumable:
# rerun the same command and finished phases are skipped, an interrupted one resumes.
#   scripts/train_default.sh [OUT_DIR]        (THREADS=2 on an idle machine)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/default}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
if [ -z "${_ACVTT_TRAIN_BG:-}" ]; then
  _ACVTT_TRAIN_BG=1 nohup "$0" "$OUT" >> "$OUT/train.log" 2>&1 &
  echo "training in the background: pid $! log $OUT/train.log"
  exit 0
fi

"$PY" -m dicom_node.devtools.sample_data --training > "$OUT/sample_data.json"  # --training: phase D data
D=var/sample-data/volumes

phase() {  # NAME BUDGET_MIN MAX_STEPS LR
  if [ -f "$OUT/phase-$1.done" ]; then
    echo "phase $1 already done"
    return 0
  fi
  echo "phase $1: budget $2 min, at most $3 steps, lr $4 ($(date -u +%FT%TZ))"
  # Held out (whole patients, never trained on): lung2 (5 mm chest), abdomen_ct (3 mm
  # abdomen/pelvis) and the abdomen DICOM series ct_dicom_repaired (maybe the same patient).
  "$PY" -m acvtt_core.cli train --sampler selfsup --out "$OUT" --preset compact --factors 2,3,4,5 \
    --data "$D/chest_cta_thin.nii.gz:iz:1" \
    --data "$D/lung1_image.nrrd:iz:1" \
    --data "$D/spine_ct.nii.gz:z:0.3" \
    --held-out lung2_image --held-out abdomen_ct --held-out ct_dicom_repaired \
    --minutes "$2" --steps "$3" --batch-size 4 --crop 128 \
    --lr "$4" --p-slab 0.4 --init he --loss mse --threads "${THREADS:-1}"
  touch "$OUT/phase-$1.done"
}

phase A 28 20000 1e-3
phase B 30 20000 1e-3
phase C 118 70000 5e-4
# Phase D (issue 15, docs/MODEL.md "More body regions"): continue C's weights with a fresh Adam,
# adding the Alderson phantom (pelvis, lumbar spine) for in-plane self-supervision + synthetic z.
# Held out besides the above: head_neck_ct (test), head_top_ct and pelvis_rt_ct (validation of
# the data choice). training/README.md has the driver; its --state resumes on another machine.
if [ ! -f "$OUT/phase-D.done" ]; then
  OMP_NUM_THREADS=1 "$PY" training/continue_default.py --run "$OUT/phase-D" \
    --base "$OUT/last.safetensors" \
    --source "$D/chest_cta_thin.nii.gz:iz:1" --source "$D/lung1_image.nrrd:iz:1" \
    --source "$D/spine_ct.nii.gz:z:0.3" --source "var/sample-data/dicom/alderson_ct:iz:1" \
    --held-out lung2_image --held-out abdomen_ct --held-out ct_dicom_repaired \
    --held-out head_neck_ct --held-out head_top_ct --held-out pelvis_rt_ct \
    --phase 36:2.5e-4 --phase 14:6.25e-5
  touch "$OUT/phase-D.done"
fi
echo "training done ($(date -u +%FT%TZ)): $OUT/phase-D/last.safetensors"
