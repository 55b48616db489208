"""`acvtt` command line: interpolate, train, eval, bench."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="ACVTT CT slice interpolation.", no_args_is_help=True, add_completion=False)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """ACVTT CT slice interpolation (numpy + torch; no DICOM networking)."""


@app.command()
def interpolate(
    inp: Path = typer.Argument(..., help="Input volume (NIfTI/NRRD/MHA) or DICOM series folder."),
    out: Path = typer.Argument(..., help="Output volume path (format from the extension)."),
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
) -> None:
    """Interpolate IN by --factor and write OUT: (d-1)*R+1 slices, z spacing / R, int16 HU."""
    from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    from acvtt_core.infer import load_interpolator
    from acvtt_core.volume_io import read_volume, to_int16_hu, write_volume

    t0 = time.perf_counter()
    vol, geom = read_volume(inp)
    interp = load_interpolator(
        checkpoint,
        device=device,
        preset=preset,
        allow_random_init=random_init,
        crop_body=not no_crop,
    )
    console.print(
        f"{inp.name}: {vol.shape[::-1]} voxels, spacing {tuple(round(s, 3) for s in geom.spacing)}; "
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
            vol, factor, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    write_volume(out, to_int16_hu(result), geom.upsampled_z(factor))
    console.print(f"wrote {out} {result.shape[::-1]} in {time.perf_counter() - t0:.1f} s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
