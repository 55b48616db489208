"""The `acvtt` command line, all of it: interpolate, train, eval, bench, adapt.

Commands import torch and the model code when they run, so that `acvtt --help` and usage errors
answer at once."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="ACVTT CT slice interpolation.", no_args_is_help=True, add_completion=False)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """ACVTT CT slice interpolation (numpy + torch; no DICOM networking)."""


FLIP_ENSEMBLE_OPTION = typer.Option(
    False,
    "--flip-ensemble",
    help="Average 4 passes over in-plane flips (4x the time; +0.1 dB mean on the held-out "
    "cases, docs/MODEL.md).",
)


@app.command()
def interpolate(
    inp: Path = typer.Argument(
        ..., metavar="IN", help="Input volume (NIfTI/NRRD/MHA) or DICOM series folder."
    ),
    out: Path = typer.Argument(
        ..., metavar="OUT", help="Output volume path (format from the extension)."
    ),
    factor: int = typer.Option(..., "--factor", "-r", min=2, help="Through-plane factor R."),
    checkpoint: Path | None = typer.Option(
        None, help="Checkpoint (.safetensors); default weights if omitted."
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    preset: str | None = typer.Option(None, help="Preset the checkpoint must match."),
    random_init: bool = typer.Option(
        False, help="Use an untrained model if no checkpoint exists (demo/test only)."
    ),
    no_crop: bool = typer.Option(False, help="Do not crop to the body bounding box."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16."),
    flip_ensemble: bool = FLIP_ENSEMBLE_OPTION,
) -> None:
    """Interpolate IN by --factor and write OUT: (d-1)*R+1 slices, z spacing / R, int16 HU."""
    from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    from acvtt_core.infer import load_interpolator
    from acvtt_core.volume_io import read_volume, to_int16_hu, write_volume

    t0 = time.perf_counter()
    # The output keeps the input's layout (array order, origin, direction); the model's slice
    # order is handled inside `interpolate` (ascending=...).
    vol, geom = read_volume(inp, as_stored=True)
    interp = load_interpolator(
        checkpoint,
        device=device,
        preset=preset,
        allow_random_init=random_init,
        crop_body=not no_crop,
        autocast_bf16=_bf16(precision),
        flip_ensemble=flip_ensemble,
    )
    console.print(
        f"{inp.name}: {vol.shape[::-1]} voxels, spacing "
        f"{tuple(round(s, 3) for s in geom.spacing)}; "
        f"model {interp.model_id} {interp.model_version} on {interp.device}"
    )
    if interp.factors and factor not in interp.factors:
        console.print(f"[yellow]warning: model trained for factors {interp.factors}, not {factor}")
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        "[progress.percentage]{task.percentage:>3.0f}%",
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("interpolating", total=None)
        result = interp.interpolate(
            vol,
            factor,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            ascending=geom.slices_ascend_along_normal,
        )
    write_volume(out, to_int16_hu(result), geom.upsampled_z(factor))
    console.print(f"wrote {out} {result.shape[::-1]} in {time.perf_counter() - t0:.1f} s")


def _bf16(precision: str) -> bool | None:
    if precision not in ("auto", "fp32", "bf16"):
        raise typer.BadParameter("precision must be auto, fp32 or bf16")
    return None if precision == "auto" else precision == "bf16"


def _parse_factors(values: list[str]) -> tuple[int, ...]:
    """--factor 2 --factor 3 or --factors 2,3,4,5 (both may repeat)."""
    try:
        out = sorted({int(v) for item in values for v in item.split(",") if v.strip()})
    except ValueError:
        raise typer.BadParameter(f"{values} are not integers", param_hint="--factor") from None
    if not out or min(out) < 2:
        raise typer.BadParameter("factors must be integers >= 2", param_hint="--factor")
    return tuple(out)


def _overrides(width: int | None, refs: int | None, levels: str | None) -> dict:
    out: dict = {}
    if width is not None:
        out["width"] = width
    if refs is not None:
        out["n_refs"] = refs
    if levels is not None:
        out["mrnla_levels"] = tuple(int(v) for v in levels.split(",") if v.strip())
    return out


def _sources(data: list[str]):
    """Training sources from --data specs PATH[:ROLES[:WEIGHT]]; a folder gives its volumes."""
    from acvtt_core.recipe import load_source, parse_source
    from acvtt_core.volume_io import find_volumes

    sources = []
    for spec in data:
        path, roles, weight = parse_source(spec)
        for p in find_volumes(path):
            s = load_source(p, roles, weight)
            console.print(
                f"source {s.name}: {s.vol.shape} spacing zyx {s.spacing} inplane={s.inplane} "
                f"synthetic_z={s.synthetic_z} weight={s.weight}"
            )
            sources.append(s)
    if not sources:
        raise typer.BadParameter("no volumes found", param_hint="--data")
    return sources


@app.command()
def train(
    data: list[str] = typer.Option(
        ...,
        "--data",
        "--source",
        help="Training volume, DICOM series folder or folder of volumes, as PATH[:ROLES[:WEIGHT]]:"
        " ROLES from 'iz' (i: in-plane self-supervision, z: synthetic z; default: iz, or z at "
        "weight 0.3 for slices under 96 pixels), WEIGHT the sampling weight. Repeat.",
    ),
    out: Path = typer.Option(..., "--out", help="Run folder (resumes from it)."),
    sampler: str | None = typer.Option(
        None,
        help="selfsup | selfsup-torch | synthetic-z (stage 1), fusion (stage 2). Default: "
        "selfsup-torch on CUDA, selfsup on CPU, fusion for --stage 2.",
    ),
    stage: int = typer.Option(1, min=1, max=2, help="1: cross-view transfer, 2: fusion."),
    preset: str = typer.Option("compact", help="Architecture preset."),
    width: int | None = typer.Option(None, help="Override C."),
    refs: int | None = typer.Option(None, help="Override R."),
    levels: str | None = typer.Option(None, help="Override MRNLA levels, e.g. '0,1' (0 = 1/8)."),
    factor_conditioning: bool = typer.Option(True, help="Condition stage 1 on 1/factor."),
    factors: list[str] = typer.Option(
        ["2,3,4,5"], "--factor", "--factors", help="Training factors: repeat or comma-separate."
    ),
    steps: int = typer.Option(20000, help="Maximum total steps (including resumed ones)."),
    minutes: float | None = typer.Option(
        None, "--minutes", "--budget-min", help="Wall-clock budget of this call, in minutes."
    ),
    batch_size: int = typer.Option(4),
    crop: int = typer.Option(128, help="Crop size (the paper uses 256)."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    lr_drop_at: float = typer.Option(
        0.75, help="lr / 4 once this fraction of --minutes or --steps is done (1: never)."
    ),
    init: str = typer.Option(
        "he", help="he (Kaiming), default (PyTorch) or a checkpoint to start from."
    ),
    loss: str = typer.Option("mse", help="mse or l1 (the paper's; learns far slower here)."),
    p_slab: float = typer.Option(0.4, help="Fraction of slab-averaged (vs decimated) samples."),
    p_inplane: float = typer.Option(0.6, help="Fraction of in-plane self-supervised batches."),
    predictor: str | None = typer.Option(
        None, help="Stage 2: checkpoint whose stage 1 makes the inputs; must not have seen --data."
    ),
    allow_leak: bool = typer.Option(False, help="Stage 2: allow a predictor trained on --data."),
    held_out: list[str] = typer.Option([], "--held-out", help="Held-out case names (metadata)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:n]."),
    precision: str = typer.Option("auto", help="auto (bf16 autocast on CUDA, fp32 on CPU), ..."),
    compile_model: bool = typer.Option(
        False, "--compile", help="torch.compile the trained stage (CUDA; unmeasured, off)."
    ),
    clip_grad: float | None = typer.Option(None, help="Clip the gradient norm to this."),
    threads: int | None = typer.Option(None, help="torch CPU threads (1 is fastest when shared)."),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(True, help="Resume from OUT's saved state."),
    log_every: int = typer.Option(25, help="Steps per train_log.jsonl line."),
    ckpt_every: int = typer.Option(250, help="Checkpoint every this many steps ..."),
    ckpt_seconds: float = typer.Option(60.0, help="... and every this many seconds."),
) -> None:
    """Train one stage of an ACVTT model; resumable. Writes OUT/last.safetensors (+json), the
    train state, train_log.jsonl, phases.jsonl and, at the end, OUT/model.safetensors."""
    import torch

    from acvtt_core.infer import resolve_device
    from acvtt_core.recipe import Recipe, default_sampler, run_training
    from acvtt_core.train import TrainConfig

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    recipe = Recipe(
        sampler=sampler or default_sampler(stage, dev),
        preset=preset,
        overrides=_overrides(width, refs, levels),
        factor_conditioning=factor_conditioning,
        init=init,
        factors=_parse_factors(factors),
        crop=crop,
        p_inplane=p_inplane,
        p_slab=p_slab,
        held_out=held_out,
        predictor=predictor,
        allow_leak=allow_leak,
    )
    cfg = TrainConfig(
        stage=stage,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        log_every=log_every,
        ckpt_every=ckpt_every,
        device=dev,
        loss=loss,
        minutes=minutes,
        ckpt_seconds=ckpt_seconds,
        lr_drop_at=lr_drop_at if lr_drop_at < 1 else None,
        bf16=_bf16(precision),
        compile=compile_model,
        clip_grad=clip_grad,
    )
    sources = _sources(data)
    console.print(f"training stage {stage} on {dev} with sampler {recipe.sampler}")
    last = run_training(sources, out, recipe, cfg, resume, log=console.print)
    step = json.loads((out / "train_state.json").read_text())["step"]
    console.print(f"done: step {step}; {last.parent / 'model.safetensors'}")


@app.command("eval")
def eval_cmd(
    data: list[Path] = typer.Option(..., "--data", help="Thin volumes (ground truth)."),
    factors: list[int] = typer.Option([4], "--factor"),
    checkpoint: Path | None = typer.Option(None),
    device: str = typer.Option("auto"),
    preset: str | None = typer.Option(None),
    random_init: bool = typer.Option(False, help="Evaluate an untrained model (smoke test)."),
    baselines_only: bool = typer.Option(False, help="Only linear and cubic."),
    out: Path = typer.Option(Path("acvtt_eval.json"), "--out", help="JSON results."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16."),
    degradation: str = typer.Option(
        "decimate",
        help="decimate: LR = HR[::R] (the paper's protocol); slab: box-profile slab averages "
        "R thin slices thick (like a clinical thick reconstruction).",
    ),
    flip_ensemble: bool = FLIP_ENSEMBLE_OPTION,
) -> None:
    """Paper protocol: LR = HR[::R]; ACVTT vs linear vs cubic; JSON + table."""
    from acvtt_core.evaluate import DEGRADATIONS, evaluate, table
    from acvtt_core.infer import load_interpolator
    from acvtt_core.recipe import volume_name
    from acvtt_core.volume_io import find_volumes, read_volume

    interp = None
    if not baselines_only:
        interp = load_interpolator(
            checkpoint,
            device=device,
            preset=preset,
            allow_random_init=random_init,
            autocast_bf16=_bf16(precision),
            flip_ensemble=flip_ensemble,
        )
    cases = {
        volume_name(p): read_volume(p)[0].astype("float32") for d in data for p in find_volumes(d)
    }
    if not cases:
        raise typer.BadParameter("no volumes found", param_hint="--data")
    if degradation not in DEGRADATIONS:
        raise typer.BadParameter(f"one of {', '.join(DEGRADATIONS)}", param_hint="--degradation")
    res = evaluate(cases, factors, interp, degradation)
    if interp is not None:
        res["model"] = {
            "id": interp.model_id,
            "version": interp.model_version,
            "device": interp.device,
            "precision": "bf16" if interp.autocast_bf16 else "fp32",
            "flip_ensemble": interp.flip_ensemble,
            "factors_trained": interp.factors,
        }
    out.write_text(json.dumps(res, indent=2))
    Console().print(table(res))
    Console().print_json(json.dumps(res["summary"]))
    console.print(f"wrote {out}")


def _parse_shape(shape: str) -> tuple[int, int, int]:
    try:
        d, h, w = (int(v) for v in shape.split(","))
    except ValueError:
        msg = f"{shape!r} is not D,H,W (three integers)"
        raise typer.BadParameter(msg, param_hint="--shape") from None
    if d < 2 or h < 1 or w < 1:
        raise typer.BadParameter(f"{shape!r}: need D >= 2 and H, W >= 1", param_hint="--shape")
    return d, h, w


def _bench_interpolator(preset: str, checkpoint: Path | None, device: str, **kwargs):
    """(interpolator, weights record) for `acvtt bench`: --checkpoint if given, else the shipped
    weights of the preset, else random-initialised weights of the preset (timing does not depend
    on the weights, so a preset without shipped weights can still be measured)."""
    from acvtt_core.infer import load_interpolator, random_interpolator, shipped_checkpoint

    path = checkpoint or shipped_checkpoint(preset)
    if path is None:
        interp = random_interpolator(preset, device=device, **kwargs)
        note = f"random init (no checkpoint for preset {preset}; speed does not depend on weights)"
        return interp, {"source": "random-init", "path": None, "note": note}
    interp = load_interpolator(path, device=device, **kwargs)
    source = "checkpoint" if checkpoint else "shipped"
    note = f"{source} {path.name} (preset {interp.meta.preset}, version {interp.model_version})"
    return interp, {"source": source, "path": str(path), "note": note}


@app.command()
def bench(
    preset: str = typer.Option("compact", help="Architecture (ignored with --checkpoint)."),
    checkpoint: Path | None = typer.Option(
        None, help="Weights (default: the preset's shipped weights, else random init)."
    ),
    shape: str = typer.Option("16,128,128", help="D,H,W of a synthetic body phantom (HU)."),
    inp: Path | None = typer.Option(None, "--input", help="Benchmark on this volume instead."),
    factor: int = typer.Option(5, min=2),
    device: str = typer.Option("auto"),
    slow_samples: int = typer.Option(4, min=1, help="Images per pass timed in the authors' loop."),
    skip_slow: bool = typer.Option(False, help="Skip the authors' loop."),
    no_crop: bool = typer.Option(False),
    precision: str = typer.Option("auto", help="auto, fp32 or bf16."),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's)."),
    out: Path | None = typer.Option(None, "--out", help="Also write JSON here."),
) -> None:
    """FLOPs, s/volume, GFLOP/s vs measured matmul rate, memory, speed-up vs the authors' loop."""
    import torch

    from acvtt_core.bench import format_report, phantom_ct, run_bench

    if threads:
        torch.set_num_threads(threads)
    if inp is not None:
        from acvtt_core.volume_io import read_volume

        vol = read_volume(inp)[0].astype("float32")
    else:
        vol = phantom_ct(*_parse_shape(shape))
    interp, weights = _bench_interpolator(
        preset, checkpoint, device, crop_body=not no_crop, autocast_bf16=_bf16(precision)
    )
    res = run_bench(interp, vol, factor, slow_samples=slow_samples, skip_slow=skip_slow)
    res["input"] = str(inp) if inp else f"phantom {shape}"
    res["weights"] = weights
    Console().print(format_report(res))
    Console().print(f"weights: {weights['note']}", soft_wrap=True)
    if out:
        out.write_text(json.dumps(res, indent=2, default=float))


@app.command("adapt")
def adapt_cmd(
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

    from acvtt_core.adapt import adapt
    from acvtt_core.checkpoint import weights_version

    torch.set_num_threads(threads)
    p = adapt(
        checkpoint,
        data,
        out,
        steps=steps,
        budget_min=budget_min,
        lr=lr,
        batch_size=batch_size,
        crop=crop,
        thin_mm=(thin_min_mm, thin_max_mm),
        synthetic_z=synthetic_z,
        log=console.print,
    )
    print(f"adapted checkpoint: {p} (version {weights_version(p)})")


def main(argv: list[str] | None = None) -> None:
    """The `acvtt` entry point: every failure ends in one `error: ...` line on stderr and a
    non-zero exit code (2 for usage errors, 130 when interrupted, 1 otherwise), never a
    traceback. ACVTT_DEBUG=1 shows the traceback."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = app(args=args or ["--help"], prog_name="acvtt", standalone_mode=False)
    except KeyboardInterrupt:
        code = _fail("interrupted", 130)
    except Exception as exc:
        if os.environ.get("ACVTT_DEBUG"):
            raise
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # click usage errors
            code = _fail(exc.format_message(), exc.exit_code or 2)
        else:
            code = _fail(_describe(exc), 1)
    sys.exit(code if isinstance(code, int) else 0)


def _describe(exc: BaseException) -> str:
    """One line for an exception; the type is named unless it is a plain user-facing error."""
    msg = " ".join(str(exc).split())
    if isinstance(exc, ValueError | OSError | RuntimeError) and msg:
        return msg
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _fail(message: str, code: int) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    main()
