"""`acvtt` command line: interpolate, train, eval, bench."""

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


def _load_volumes(paths: list[Path]):
    """Volume files and folders of volume files (DICOM series folders read as one volume)."""
    from acvtt_core.volume_io import read_volume

    files: list[Path] = []
    for p in paths:
        if p.is_dir() and not any(
            f.suffix.lower() in (".dcm", "") for f in p.iterdir() if f.is_file()
        ):
            files += sorted(
                f
                for f in p.iterdir()
                if f.name.endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"))
            )
        else:
            files.append(p)
    out = []
    for f in files:
        vol, geom = read_volume(f)
        name = f.name.split(".")[0]
        out.append((name, vol.astype("float32"), geom))
    if not out:
        raise typer.BadParameter("no volumes found")
    return out


def _model_config(
    preset: str, width: int | None, refs: int | None, levels: str | None, factor_conditioning: bool
):
    from dataclasses import replace

    from acvtt_core.config import get_preset

    cfg = get_preset(preset).model
    changes = {}
    if width is not None:
        changes["width"] = width
    if refs is not None:
        changes["n_refs"] = refs
    if levels is not None:
        changes["mrnla_levels"] = tuple(int(v) for v in levels.split(",") if v.strip())
    if factor_conditioning:
        changes["factor_conditioning"] = True
    return replace(cfg, **changes)


def _sampler_factory(spec: str | None):
    if not spec:
        from acvtt_core.train import SyntheticZSampler

        def default(volumes, names, spacings, factors, crop, n_refs):
            return SyntheticZSampler(volumes, factors, crop, n_refs, names)

        return default
    import importlib

    mod, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod), attr)


@app.command()
def train(
    data: list[Path] = typer.Option(..., "--data", help="Thin volumes (files or folders)."),
    out: Path = typer.Option(..., "--out", help="Run folder (resumes from it)."),
    preset: str = typer.Option("compact", help="Architecture preset."),
    width: int | None = typer.Option(None, help="Override C."),
    refs: int | None = typer.Option(None, help="Override R."),
    levels: str | None = typer.Option(None, help="Override MRNLA levels, e.g. '0,1' (0 = 1/8)."),
    factor_conditioning: bool = typer.Option(False, help="Condition stage 1 on the factor."),
    factors: list[int] = typer.Option([4], "--factor", help="Training factor(s)."),
    stage: int = typer.Option(1, min=1, max=2, help="1: cross-view transfer, 2: fusion."),
    steps: int = typer.Option(1000, help="Total steps (including resumed ones)."),
    batch_size: int = typer.Option(2),
    crop: int = typer.Option(128, help="Crop size (the paper uses 256)."),
    lr: float = typer.Option(1e-4),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    init: Path | None = typer.Option(None, help="Start from this checkpoint's weights."),
    predictor: Path | None = typer.Option(
        None, help="Stage 2: checkpoint whose stage 1 makes the inputs; must not have seen --data."
    ),
    allow_leak: bool = typer.Option(False, help="Stage 2: allow a predictor trained on --data."),
    sampler: str | None = typer.Option(
        None, help="Stage 1 sampler factory 'module:callable' (default: synthetic z decimation)."
    ),
    resume: bool = typer.Option(True, help="Resume from OUT's saved state."),
    log_every: int = typer.Option(10),
    ckpt_every: int = typer.Option(100),
) -> None:
    """Train one stage. Writes OUT/last.safetensors (+json), train state and train_log.jsonl."""
    import shutil

    from acvtt_core.checkpoint import CheckpointMeta, load_checkpoint
    from acvtt_core.infer import resolve_device
    from acvtt_core.model import ACVTT
    from acvtt_core.train import FusionSampler, TrainConfig, stage1_predictions
    from acvtt_core.train import train as run_train
    from acvtt_core.volume import normalise_hu

    dev = resolve_device(device)
    vols = _load_volumes(data)
    names = [n for n, _, _ in vols]
    if init is not None:
        model, meta, _ = load_checkpoint(init)
    else:
        cfg = _model_config(preset, width, refs, levels, factor_conditioning)
        model = ACVTT(cfg)
        meta = CheckpointMeta(preset=preset, model=cfg, factors=sorted(factors))
    meta.factors = sorted(set(meta.factors) | set(factors))
    norm = [normalise_hu(v) for _, v, _ in vols]
    if stage == 1:
        smp = _sampler_factory(sampler)(
            volumes=norm,
            names=names,
            spacings=[g.spacing for _, _, g in vols],
            factors=factors,
            crop=crop,
            n_refs=model.cfg.n_refs,
        )
    else:
        pred_model = model
        pred_data = meta.training_data
        if predictor is not None:
            pred_model, pmeta, _ = load_checkpoint(predictor)
            pred_data = pmeta.training_data
        seen = set(pred_data.get("volumes", []) if isinstance(pred_data, dict) else [])
        leak = seen & set(names)
        if leak and not allow_leak:
            raise typer.BadParameter(
                f"stage-1 predictor was trained on {sorted(leak)}; stage 2 would learn from leaked "
                "results. Pass --predictor trained on other volumes (or --allow-leak)."
            )
        records = []
        for v, name in zip(norm, names, strict=True):
            for r in factors:
                console.print(f"stage-1 predictions for {name} x{r}")
                cor, sag, hr = stage1_predictions(pred_model, v, r, dev)
                records.append((cor, sag, hr, r))
        smp = FusionSampler(records, crop, names)
    prev = meta.training_data if isinstance(meta.training_data, dict) else {}
    meta.training_data = {
        **prev,
        "volumes": sorted(set(prev.get("volumes", [])) | set(names)),
        f"stage{stage}": smp.describe(),
    }
    tcfg = TrainConfig(
        stage=stage,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        log_every=log_every,
        ckpt_every=ckpt_every,
        device=dev,
    )
    losses = run_train(
        model, smp, tcfg, meta, out, resume=resume, log=lambda rec: console.print(rec)
    )
    shutil.copy(out / "last.safetensors", out / "model.safetensors")
    shutil.copy(out / "last.json", out / "model.json")
    if losses:
        console.print(
            f"done: {len(losses)} steps, last loss {losses[-1]:.5f}; {out / 'model.safetensors'}"
        )


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
    cases = {n: v for n, v, _ in _load_volumes(data)}
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


# Issue 4: site adaptation and the default-model recipe (acvtt_core/adapt.py, lazy imports).
from acvtt_core.adapt import adapt_command, train_selfsup_command  # noqa: E402

app.command("adapt")(adapt_command)
app.command("train-selfsup")(train_selfsup_command)


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
