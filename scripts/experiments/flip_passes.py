"""Experiment (docs/MODEL.md, "Slice order" and "Flip ensemble"): the shipped model on the held-out
cases with the thick volume flipped along z, rows and/or columns (each result flipped back), one
pass per flip set, and the gain of averaging some of those passes.

    python scripts/experiments/flip_passes.py 4            # factors, comma-separated
    python scripts/experiments/flip_passes.py 2,5 slab     # degradation: decimate (default) | slab

Prints each pass's and each combination's PSNR gain over the better of linear and cubic, and writes
runs/tta/tta_<degradation>_<factors>.json.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from acvtt_core.evaluate import thick_volume
from acvtt_core.infer import load_interpolator
from acvtt_core.metrics import EDGE, MIN_DEPTH, paper_metrics
from acvtt_core.volume import cubic_upsample_z, linear_upsample_z, normalise_hu
from acvtt_core.volume_io import read_volume

CASES = {
    "lung2": "var/sample-data/volumes/lung2_image.nrrd",
    "abdomen": "var/sample-data/volumes/abdomen_ct.nii.gz",
    "dicom": "var/sample-data/dicom/ct_repaired",
}
FLIPS = {
    "id": (),
    "z": (0,),
    "x": (2,),
    "y": (1,),
    "zx": (0, 2),
    "zy": (0, 1),
    "xy": (1, 2),
    "zxy": (0, 1, 2),
}
COMBOS = {
    "id": ["id"],
    "id+z": ["id", "z"],
    "id+x": ["id", "x"],
    "id+y": ["id", "y"],
    "4:id,z,x,zx": ["id", "z", "x", "zx"],
    "4:id,x,y,xy": ["id", "x", "y", "xy"],
    "all8": list(FLIPS),
}

factors = [int(x) for x in sys.argv[1].split(",")]
degradation = sys.argv[2] if len(sys.argv) > 2 else "decimate"
interp = load_interpolator(device="cpu")
results = []
for name, path in CASES.items():
    hu = read_volume(path)[0].astype(np.float32)
    for r in factors:
        hr, lr = thick_volume(hu, r, degradation)
        if hr.shape[0] - 2 * EDGE < MIN_DEPTH:
            continue
        gt, lrn = normalise_hu(hr), normalise_hu(lr)
        best = max(
            paper_metrics(linear_upsample_z(lrn, r), gt, r)["psnr"],
            paper_metrics(cubic_upsample_z(lrn, r), gt, r)["psnr"],
        )
        outs = {}
        for key, axes in FLIPS.items():
            t = time.perf_counter()
            out = interp.interpolate(np.ascontiguousarray(np.flip(lr, axes)), r)
            outs[key] = normalise_hu(np.ascontiguousarray(np.flip(out, axes)))
            gain = paper_metrics(outs[key], gt, r)["psnr"] - best
            print(f"{name} x{r} pass {key}: {gain:+.3f} dB ({time.perf_counter() - t:.1f} s)")
        for combo, keys in COMBOS.items():
            psnr = paper_metrics(np.mean([outs[k] for k in keys], 0), gt, r)["psnr"]
            results.append(
                {"case": name, "factor": r, "combo": combo, "gain": psnr - best, "psnr": psnr}
            )
            print(f"  {name} x{r} mean of {combo}: {psnr - best:+.3f} dB", flush=True)
out_path = Path(f"runs/tta/tta_{degradation}_{sys.argv[1].replace(',', '')}.json")
out_path.parent.mkdir(parents=True, exist_ok=True)
out_path.write_text(json.dumps(results, indent=1))
print(f"wrote {out_path}")
