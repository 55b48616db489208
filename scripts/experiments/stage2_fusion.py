"""Experiment (docs/MODEL.md, "Stage 2"): train the stage-2 fusion of the shipped model on its
training volumes and write a checkpoint to compare with the shipped one in `acvtt eval`.

    python scripts/experiments/stage2_fusion.py OUT_DIR [THREADS] [STEPS]

Stage-1 results of the shipped weights on chest_cta_thin and lung1 (the spine crop is too small
for 128 px crops), x2..x5, thick volumes by decimation and by box slab averaging; fusion trained
with MSE on the synthesised slices only (measured rows are kept as input at inference), Adam
1e-3, batch 8, 128 px crops. The stage-1 predictor saw these volumes (no cross-fitting: one CPU
session cannot train a second stage 1).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from acvtt_core.checkpoint import load_checkpoint
from acvtt_core.evaluate import thick_volume
from acvtt_core.infer import DEFAULT_CHECKPOINT, Interpolator
from acvtt_core.recipe import load_source
from acvtt_core.train import FusionSampler, TrainConfig, train

out = Path(sys.argv[1])
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 4000
model, meta, _ = load_checkpoint(DEFAULT_CHECKPOINT)
volumes = Path("var/sample-data/volumes")
sources = [load_source(volumes / f) for f in ("chest_cta_thin.nii.gz", "lung1_image.nrrd")]
interp = Interpolator(model, meta, "stage2-exp", device="cpu", crop_body=False)
records = []
t0 = time.time()
for src in sources:
    for r in (2, 3, 4, 5):
        for mode in ("decimate", "slab"):
            hr, lr = thick_volume(src.vol, r, mode)
            cor, sag = interp.stage1_normalised(lr, r)
            synth = np.ones(hr.shape[0], bool)
            synth[::r] = False
            records.append((cor[synth], sag[synth], hr[synth], r))
            print(src.name, r, mode, hr.shape, f"{time.time() - t0:.0f} s", flush=True)
sampler = FusionSampler(records, crop=128, names=[s.name for s in sources])
cfg = TrainConfig(
    stage=2, steps=steps, batch_size=8, lr=1e-3, log_every=50, ckpt_every=250, loss="mse"
)
train(model, sampler, cfg, meta, out, log=lambda rec: print(json.dumps(rec), flush=True))
print(f"wrote {out / 'last.safetensors'}")
