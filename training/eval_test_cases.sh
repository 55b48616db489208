#!/bin/bash
# The held-out test table of docs/MODEL.md for one checkpoint: `acvtt eval` on the four test
# cases (lung2, abdomen, the 2 mm DICOM series, head/neck) at x2/x4/x5 on two threads, then the
# gain of each row over the better of linear and cubic, and the means per factor.
#
#   training/eval_test_cases.sh CHECKPOINT OUT.json
#
# Pause a training run first (touch RUN/PAUSE; wait until its CPU time stops), so that the
# figures and the run do not share the cores. Needs the sample data
# (python -m dicom_node.devtools.sample_data --training).
set -euo pipefail
CKPT=${1:?checkpoint}
OUT=${2:?output json}
cd "$(dirname "$0")/.."
V=var/sample-data/volumes
OMP_NUM_THREADS=2 /usr/bin/time -v .venv/bin/acvtt eval --data $V/lung2_image.nrrd \
  --data $V/abdomen_ct.nii.gz --data var/sample-data/dicom/ct_repaired \
  --data $V/head_neck_ct.nii.gz --factor 2 --factor 4 --factor 5 --checkpoint "$CKPT" \
  --device cpu --out "$OUT" > "${OUT%.json}.log" 2>&1
.venv/bin/python - "$OUT" <<'PY'
import json
import sys
from collections import defaultdict

from acvtt_core.evaluate import gains_over_best_baseline

rows = json.load(open(sys.argv[1]))["rows"]
per_factor = defaultdict(list)
for (case, factor), gain in sorted(gains_over_best_baseline(rows).items()):
    print(f"{case:16s} x{factor}: {gain:+.2f}")
    per_factor[factor].append(gain)
for factor, gains in sorted(per_factor.items()):
    print(f"mean x{factor}: {sum(gains) / len(gains):+.2f} (n={len(gains)})")
PY
