#!/usr/bin/env bash
# One GPU, a few minutes (issue 16): check the environment, run the CUDA tests, measure CUDA
# inference of the paper preset, train the paper preset for MINUTES on the default model's
# training volumes with the samples made on the GPU, and leave everything in OUTDIR.
#
#   scripts/gpu_train.sh OUTDIR [MINUTES]          (MINUTES of training, default 5)
#
# Needs only the repository after ./scripts/setup.sh, plus the three training volumes in
# var/sample-data/volumes (fetched with `python -m dicom_node.devtools.sample_data` when missing, which
# needs the network; on an offline machine bring chest_cta_thin.nii.gz, lung1_image.nrrd and
# spine_ct.nii.gz along, about 23 MB). Every failure ends in one line `gpu_train: error: ...`.
# Settings (environment): PRESET=paper BATCH=16 CROP=256 LR=5e-4 COMPILE=0 (1: torch.compile)
#   DATA=var/sample-data/volumes PYTHON=.venv/bin/python
# OUTDIR afterwards:
#   env.txt                  nvidia-smi, torch and CUDA versions
#   cuda_tests.log           pytest tests/test_acvtt_cuda.py (none may skip)
#   bench_<preset>_cuda.json + bench.log   acvtt bench --shape 60,512,512 --factor 5 --device cuda
#   run/                     the training run: last.safetensors + last.json and train_state.* (a
#                            checkpoint each minute; rerunning resumes), model.safetensors + json
#                            (the final weights, same format), train_log.jsonl, phases.jsonl
#   train.log, summary.txt
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "gpu_train: error: $*" >&2
  exit 1
}

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: scripts/gpu_train.sh OUTDIR [MINUTES]"
OUT=$1
MINUTES=${2:-5}
[[ $MINUTES =~ ^[0-9]+([.][0-9]+)?$ ]] || die "MINUTES must be a number, got '$MINUTES'"
PRESET=${PRESET:-paper}
BATCH=${BATCH:-16}
CROP=${CROP:-256}
LR=${LR:-5e-4}
DATA=${DATA:-var/sample-data/volumes}
PY=${PYTHON:-.venv/bin/python}

# 1. environment: a GPU, a driver, and a torch that can use them.
[ -x "$PY" ] || die "no $PY: run ./scripts/setup.sh first"
command -v nvidia-smi > /dev/null 2>&1 || die "no NVIDIA GPU here: nvidia-smi not found"
smi=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1) ||
  die "no usable NVIDIA GPU: nvidia-smi failed: $(echo "$smi" | head -n 1)"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null ||
  die "torch cannot use the GPU ($smi): torch.cuda.is_available() is False (a CPU wheel? rerun ./scripts/setup.sh where nvidia-smi works)"
mkdir -p "$OUT"
{
  date -u +%FT%TZ
  nvidia-smi
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name(0))'
} > "$OUT/env.txt" 2>&1
echo "gpu_train: $smi; training $PRESET for $MINUTES min into $OUT"

# 2. the training volumes (the default model's: docs/MODEL.md).
VOLS=(chest_cta_thin.nii.gz lung1_image.nrrd spine_ct.nii.gz)
for v in "${VOLS[@]}"; do
  if [ ! -f "$DATA/$v" ]; then
    echo "gpu_train: $DATA/$v missing, fetching the sample data"
    "$PY" -m dicom_node.devtools.sample_data > "$OUT/sample_data.json" 2> "$OUT/sample_data.log" ||
      die "training volume $DATA/$v missing and the sample data cannot be fetched (see $OUT/sample_data.log)"
    [ -f "$DATA/$v" ] || die "training volume $DATA/$v missing after fetching the sample data"
  fi
done

# 3. the CUDA tests: they must run, not skip.
ACVTT_TEST_COMPILE=${COMPILE:-0} "$PY" -m pytest tests/test_acvtt_cuda.py -q -rs -p no:cacheprovider \
  > "$OUT/cuda_tests.log" 2>&1 ||
  die "CUDA tests failed (see $OUT/cuda_tests.log)"
! grep -q "needs a CUDA GPU" "$OUT/cuda_tests.log" || die "CUDA tests skipped (see $OUT/cuda_tests.log)"
echo "gpu_train: CUDA tests: $(tail -n 1 "$OUT/cuda_tests.log")"

# 4. CUDA inference speed of the preset (random weights unless some are shipped for it).
BENCH_JSON="$OUT/bench_${PRESET}_cuda.json"
"$PY" -m acvtt_core.cli bench --preset "$PRESET" --shape 60,512,512 --factor 5 --device cuda \
  --out "$BENCH_JSON" > "$OUT/bench.log" 2>&1 || die "acvtt bench failed (see $OUT/bench.log)"
grep -E "^seconds/volume" "$OUT/bench.log" | sed 's/^/gpu_train: bench: /' || true

# 5. training: samples made on the GPU, bf16 autocast, a checkpoint each minute.
EXTRA=()
[ "${COMPILE:-0}" = 1 ] && EXTRA+=(--compile)
"$PY" -m acvtt_core.cli train --device cuda --preset "$PRESET" --minutes "$MINUTES" \
  --out "$OUT/run" --sampler selfsup-torch \
  --data "$DATA/chest_cta_thin.nii.gz:iz:1" --data "$DATA/lung1_image.nrrd:iz:1" \
  --data "$DATA/spine_ct.nii.gz:z:0.3" \
  --held-out lung2_image --held-out abdomen_ct --held-out ct_dicom_repaired \
  --batch-size "$BATCH" --crop "$CROP" --lr "$LR" --clip-grad 1.0 --steps 10000000 \
  --ckpt-seconds 60 --log-every 50 "${EXTRA[@]}" > "$OUT/train.log" 2>&1 ||
  die "training failed (see $OUT/train.log; rerunning this script resumes from $OUT/run)"

# 6. a summary of what ran.
"$PY" - "$OUT" "$BENCH_JSON" > "$OUT/summary.txt" << 'EOF'
import json, sys
from pathlib import Path
out, bench = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
phases = [json.loads(x) for x in (out / "run" / "phases.jsonl").read_text().splitlines()]
st = bench["stage_seconds"]
print(f"bench {bench['preset']} {bench['shape_in']} x{bench['factor']} on {bench['device']}: "
      f"{bench['seconds']:.2f} s/volume; stages {st}; achieved "
      f"{bench['achieved_gflops_executed']:.0f} GFLOP/s executed, matmul bf16 "
      f"{bench.get('matmul_bf16_gflops', 0):.0f} GFLOP/s; components {bench['component_gflops']}; "
      f"weights {bench['weights']['source']}")
last = phases[-1]
print(f"training: {last['step']} steps, {last['s_per_step']} s/step at the end, "
      f"{last['elapsed_min']} min; last checkpoint {json.dumps(last)}")
print(f"weights: {out / 'run' / 'model.safetensors'}")
EOF
cat "$OUT/summary.txt"
