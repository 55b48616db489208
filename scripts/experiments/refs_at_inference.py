"""Experiment (docs/MODEL.md, "Stage 2 and reference count"): does the shipped model, trained
with R = 2 axial references, gain from more (or fewer) references at inference? Measured on the
*training* patients only (chest_cta_thin, lung1), so the held-out cases stay untouched.

    python scripts/experiments/refs_at_inference.py 2,4
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from acvtt_core.checkpoint import load_checkpoint
from acvtt_core.evaluate import evaluate, gains_over_best_baseline
from acvtt_core.infer import DEFAULT_CHECKPOINT, Interpolator
from acvtt_core.volume_io import read_volume

torch.set_num_threads(2)
model, meta, _ = load_checkpoint(DEFAULT_CHECKPOINT)
volumes = Path("var/sample-data/volumes")
cases = {
    "chest_cta_thin": read_volume(volumes / "chest_cta_thin.nii.gz")[0],
    "lung1": read_volume(volumes / "lung1_image.nrrd")[0],
}
for n_refs in (int(a) for a in sys.argv[1].split(",")):
    cfg = dataclasses.replace(meta.model, n_refs=n_refs)
    model.cfg = model.stage1.cfg = cfg  # the MRNLA softmax runs over however many references
    interp = Interpolator(model, meta, "refs-exp", device="cpu")
    interp.cfg = cfg
    t0 = time.time()
    gains = {
        f"{c} x{f} gain dB": round(g, 3)
        for (c, f), g in gains_over_best_baseline(
            evaluate(cases, [2, 4, 5], interp)["rows"]
        ).items()
    }
    print(json.dumps({"n_refs": n_refs, "seconds": round(time.time() - t0), **gains}), flush=True)
