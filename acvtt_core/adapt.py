"""Site adaptation: fine-tune an ACVTT model on a site's own thick-slice scans only.

`acvtt adapt --checkpoint BASE --data DIR_OF_THICK_VOLUMES --out NEW` continues training stage 1
of BASE with in-plane self-supervision (`acvtt_core.selfsup`) on the axial slices of every volume
in DIR: no thin slices are needed. The thin spacings taught span `--thin-min-mm`..`--thin-max-mm`
(default 0.8..5 mm as in the base recipe); the factors are BASE's. With `--synthetic-z` the
thick volumes' own z axis is used too (HR[::r] of the thick slices).

NEW is a normal checkpoint (safetensors + JSON) whose metadata keeps BASE's training data and
records the adaptation (volumes, steps, lr, base version).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from acvtt_core.checkpoint import load_checkpoint, save_checkpoint
from acvtt_core.recipe import Recipe, load_source, run_training
from acvtt_core.train import TrainConfig
from acvtt_core.volume_io import find_volumes


def adapt(
    checkpoint: Path,
    data: Path,
    out: Path,
    steps: int = 400,
    budget_min: float = 20.0,
    lr: float = 1e-4,
    batch_size: int = 4,
    crop: int = 128,
    thin_mm: tuple[float, float] = (0.8, 5.0),
    synthetic_z: bool = False,
    seed: int = 0,
    work: Path | None = None,
    log=print,
) -> Path:
    """Fine-tune `checkpoint` on the thick volumes in `data`; write `out` (.safetensors + .json).
    Resumable through the work folder (default: OUT's name + '.work')."""
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    work = Path(work) if work else out.parent / (out.stem + ".work")
    vols = find_volumes(Path(data))
    if not vols:
        raise ValueError(f"no volumes found in {data}")
    _, base_meta, base_version = load_checkpoint(checkpoint)
    sources = [load_source(v, "iz" if synthetic_z else "i", 1.0) for v in vols]
    for s in sources:
        log(f"adapting on {s.name}: {s.vol.shape} spacing zyx {s.spacing}")
    t0 = time.time()
    recipe = Recipe(
        sampler="selfsup",
        init=str(checkpoint),
        factors=tuple(base_meta.factors or (2, 3, 4, 5)),
        crop=crop,
        p_inplane=0.7 if synthetic_z else 1.0,
        thin_mm=tuple(thin_mm),
    )
    cfg = TrainConfig(
        steps=steps,
        minutes=budget_min,
        batch_size=batch_size,
        lr=lr,
        lr_drop_at=0.75,
        seed=seed,
        log_every=25,
        ckpt_every=100,
        loss="mse",
    )
    last = run_training(sources, work, recipe, cfg, log=log)
    model, work_meta, _ = load_checkpoint(last)
    meta = copy.deepcopy(base_meta)
    meta.code_version = work_meta.code_version
    meta.model_id = f"{base_meta.model_id}-adapted"
    meta.metrics = {"base_metrics": base_meta.metrics} if base_meta.metrics else {}
    meta.extra = dict(base_meta.extra)
    meta.extra["adaptation"] = {
        "base_checkpoint": str(checkpoint),
        "base_version": base_version,
        "volumes": {
            s.name: {"spacing_mm_zyx": list(s.spacing), "shape": list(s.vol.shape)} for s in sources
        },
        "self_supervision": "in-plane" + (" + synthetic z" if synthetic_z else " only"),
        "thin_mm": list(thin_mm),
        "training": work_meta.extra.get("training", {}),
        "wall_s": round(time.time() - t0, 1),
    }
    save_checkpoint(out, model, meta)
    log(f"wrote {out}")
    return out
