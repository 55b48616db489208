"""Experiment (docs/MODEL.md, "Weight averaging"): does a uniform average of checkpoints along the
width-8 continuation (stochastic weight averaging over its committed states) beat its last step?

Candidates are compared on the *validation* volumes only (pelvis_rt_ct and head_top_ct: held out
of training, used before for the data choice, never test cases). The test table is run once,
afterwards, on the candidate this picks.

    python scripts/experiments/average_weights.py OUT_DIR NAME=CKPT[+CKPT...] ...

Each NAME is written to OUT_DIR/NAME.safetensors (+ .json) as the uniform mean of its checkpoints
(all must describe the same model config), then evaluated at x2, x4 and x5. Prints one JSON line
per candidate with its validation gains (dB over the better of linear and cubic) and their mean.
"""

import json
import sys
import time
from pathlib import Path

import torch

from acvtt_core.checkpoint import load_checkpoint, save_checkpoint, weights_version
from acvtt_core.evaluate import evaluate, gains_over_best_baseline
from acvtt_core.infer import Interpolator
from acvtt_core.volume_io import read_volume

VALIDATION = ("pelvis_rt_ct", "head_top_ct")


def average(paths: list[str]):
    models = [load_checkpoint(p) for p in paths]
    model, meta, _ = models[-1]
    if any(m.cfg != model.cfg for m, _, _ in models):
        raise SystemExit(f"checkpoints differ in model config: {paths}")
    states = [m.state_dict() for m, _, _ in models]
    model.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]})
    meta.extra = dict(
        meta.extra, averaged_from=[[p, v] for p, (_, _, v) in zip(paths, models, strict=True)]
    )
    return model, meta


def main() -> None:
    torch.set_num_threads(2)
    out = Path(sys.argv[1])
    volumes = Path("var/sample-data/volumes")
    cases = {c: read_volume(volumes / f"{c}.nii.gz")[0] for c in VALIDATION}
    for spec in sys.argv[2:]:
        name, members = spec.split("=", 1)
        model, meta = average(members.split("+"))
        path = save_checkpoint(out / f"{name}.safetensors", model, meta)
        interp = Interpolator(model, meta, weights_version(path), device="cpu")
        t0 = time.time()
        rows = evaluate(cases, [2, 4, 5], interp)["rows"]
        gains = {f"{c} x{f}": round(g, 3) for (c, f), g in gains_over_best_baseline(rows).items()}
        mean = round(sum(gains.values()) / len(gains), 3)
        line = {"name": name, "version": interp.model_version, "mean": mean, **gains}
        print(json.dumps({**line, "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
