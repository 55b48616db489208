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

import typer

# Heavy imports (torch, the model) happen inside the functions so that registering these commands
# in the `acvtt` CLI costs nothing at start-up.

VOLUME_EXTS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def find_volumes(data: Path) -> list[Path]:
    """Volume files (NIfTI, NRRD, MHA) and DICOM series folders directly under `data` (or
    `data` itself if it is a volume file or a DICOM folder)."""
    data = Path(data)
    if data.is_file():
        return [data]
    found = sorted(p for p in data.iterdir() if p.is_file() and p.name.endswith(VOLUME_EXTS))
    dirs = sorted(p for p in data.iterdir() if p.is_dir() and any(f.is_file() for f in p.iterdir()))
    if not found and not dirs:
        return [data]  # maybe a DICOM series folder itself
    return found + dirs


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
    threads: int = 2,
    seed: int = 0,
    work: Path | None = None,
    log=print,
) -> Path:
    """Fine-tune `checkpoint` on the thick volumes in `data`; write `out` (.safetensors + .json).
    Resumable through the work folder (default: OUT's name + '.work')."""
    from acvtt_core.checkpoint import load_checkpoint, save_checkpoint
    from acvtt_core.recipe import load_source, run_recipe

    out = Path(out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    work = Path(work) if work else out.parent / (out.stem + ".work")
    vols = find_volumes(data)
    if not vols:
        raise typer.BadParameter(f"no volumes found in {data}")
    _, base_meta, base_version = load_checkpoint(checkpoint)
    sources = [load_source(v, "iz" if synthetic_z else "i") for v in vols]
    for s in sources:
        log(f"adapting on {s.name}: {s.vol.shape} spacing zyx {s.spacing}")
    t0 = time.time()
    last = run_recipe(
        sources,
        work,
        factors=tuple(base_meta.factors or (2, 3, 4, 5)),
        steps=steps,
        budget_min=budget_min,
        batch_size=batch_size,
        crop=crop,
        lr=lr,
        phase_steps=100,
        seed=seed,
        threads=threads,
        base=Path(checkpoint),
        log=log,
        p_inplane=0.7 if synthetic_z else 1.0,
        sampler_kwargs={"thin_mm": tuple(thin_mm)},
    )
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


def adapt_command(
    checkpoint: Path = typer.Option(..., help="Base checkpoint (.safetensors)."),
    data: Path = typer.Option(..., help="Folder of the site's thick volumes (or one volume)."),
    out: Path = typer.Option(..., help="Adapted checkpoint to write (.safetensors + .json)."),
    steps: int = typer.Option(400, help="Fine-tuning steps."),
    budget_min: float = typer.Option(20.0, help="Wall-clock budget in minutes."),
    lr: float = typer.Option(1e-4, help="Learning rate."),
    batch_size: int = typer.Option(4),
    crop: int = typer.Option(128),
    thin_min_mm: float = typer.Option(0.8, help="Finest thin spacing taught (mm)."),
    thin_max_mm: float = typer.Option(5.0, help="Coarsest thin spacing taught (mm)."),
    synthetic_z: bool = typer.Option(False, help="Also train on the thick volumes' own z axis."),
    threads: int = typer.Option(1, help="CPU threads (1 is fastest on a shared 2-core box)."),
) -> None:
    """Fine-tune a model with in-plane self-supervision on a site's own thick scans only."""
    import torch

    from acvtt_core.checkpoint import weights_version

    torch.set_num_threads(threads)
    p = adapt(
        checkpoint,
        data,
        out,
        steps,
        budget_min,
        lr,
        batch_size,
        crop,
        (thin_min_mm, thin_max_mm),
        synthetic_z,
        threads,
    )
    print(f"adapted checkpoint: {p} (version {weights_version(p)})")


def train_selfsup_command(
    source: list[str] = typer.Option(
        ...,
        "--source",
        help="PATH[:ROLES[:WEIGHT]], ROLES from 'iz' (i: in-plane, z: synthetic z).",
    ),
    out: Path = typer.Option(..., "--out", help="Run folder (resumes from it)."),
    preset: str = typer.Option("compact", help="Architecture preset (factor conditioning added)."),
    factors: str = typer.Option("2,3,4,5", help="Factors taught, comma separated."),
    steps: int = typer.Option(20000, help="Maximum total steps."),
    budget_min: float = typer.Option(55.0, help="Wall-clock budget in minutes (per call)."),
    batch_size: int = typer.Option(4),
    crop: int = typer.Option(128),
    lr: float = typer.Option(1e-3, help="Learning rate (divided by 4 for the last quarter)."),
    p_slab: float = typer.Option(0.4, help="Fraction of slab-averaged (vs decimated) samples."),
    init: str = typer.Option("he", help="he (Kaiming) or default (PyTorch) initialisation."),
    loss: str = typer.Option("mse", help="mse or l1 (the paper's; learns far slower here)."),
    threads: int = typer.Option(1, help="CPU threads (1 is fastest on a shared 2-core box)."),
    seed: int = typer.Option(0),
    held_out: list[str] = typer.Option([], "--held-out", help="Held-out case names (metadata)."),
) -> None:
    """Train the default model's stage 1: in-plane self-supervision + synthetic z, x2..x5,
    decimation + slab averaging, one factor-conditioned model (docs/MODEL.md)."""
    from acvtt_core.recipe import main as recipe_main

    argv = [a for s in source for a in ("--source", s)]
    argv += [a for h in held_out for a in ("--held-out", h)]
    argv += [
        "--out",
        str(out),
        "--preset",
        preset,
        "--factors",
        factors,
        "--steps",
        str(steps),
        "--budget-min",
        str(budget_min),
        "--batch-size",
        str(batch_size),
        "--crop",
        str(crop),
        "--lr",
        str(lr),
        "--threads",
        str(threads),
        "--seed",
        str(seed),
        "--p-slab",
        str(p_slab),
        "--init",
        init,
        "--loss",
        loss,
    ]
    recipe_main(argv)


def main() -> None:
    typer.run(adapt_command)


if __name__ == "__main__":
    main()
