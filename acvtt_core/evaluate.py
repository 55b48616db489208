"""The paper's evaluation protocol: synthetic thick volumes by z decimation, ACVTT against linear
and cubic interpolation in one run. `degradation="slab"` makes the thick volume by slab
averaging instead (a box slice profile r thin slices thick, as a clinical thick reconstruction
is), everything else unchanged."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from acvtt_core.metrics import EDGE, MIN_DEPTH, paper_metrics
from acvtt_core.volume import (
    cubic_upsample_z,
    decimate,
    linear_upsample_z,
    normalise_hu,
    trim_for_factor,
)

METHODS = ("linear", "cubic", "acvtt")
# The figures of each evaluated (case, factor, method) row, as ``paper_metrics`` names them.
METRICS = ("psnr", "ssim", "psnr_synth", "ssim_axial", "ssim_coronal", "ssim_sagittal")


DEGRADATIONS = ("decimate", "slab")


def thick_volume(hu: np.ndarray, factor: int, degradation: str = "decimate"):
    """(trimmed HR, thick LR) in HU: LR = HR[::factor] ("decimate", the paper's protocol) or the
    box-profile slab average centred on the same thin slices ("slab")."""
    if degradation == "decimate":
        return decimate(hu, factor)
    if degradation == "slab":
        from acvtt_core.selfsup import slab_volume

        hr = trim_for_factor(hu, factor)
        return hr, slab_volume(hr, factor, "box")
    raise ValueError(f"unknown degradation {degradation!r}; one of {DEGRADATIONS}")


def evaluate(
    cases: Mapping[str, np.ndarray],
    factors: Sequence[int],
    interp=None,
    degradation: str = "decimate",
) -> dict[str, Any]:
    """Evaluate every (case, factor): HR is the trimmed thin volume in HU, LR its thick version
    (`thick_volume`). `interp` is an `Interpolator` (None evaluates the baselines only). Returns
    {"rows": [...], "summary": {...}, "skipped": [...]} with one row per case, factor and method;
    a (case, factor) whose volume is too thin for the protocol is listed in "skipped"."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for name, hu in cases.items():
        for r in factors:
            hr_hu, lr_hu = thick_volume(np.asarray(hu, np.float32), r, degradation)
            if lr_hu.shape[0] < 2 or hr_hu.shape[0] - 2 * EDGE < MIN_DEPTH:
                skipped.append(
                    {
                        "case": name,
                        "factor": r,
                        "reason": f"{hr_hu.shape[0]} thin slices leave fewer than {MIN_DEPTH} "
                        f"after dropping {EDGE} at each end",
                    }
                )
                continue
            gt = normalise_hu(hr_hu)
            lr = normalise_hu(lr_hu)
            preds = {}
            t = time.perf_counter()
            preds["linear"] = (linear_upsample_z(lr, r), time.perf_counter() - t)
            t = time.perf_counter()
            preds["cubic"] = (cubic_upsample_z(lr, r), time.perf_counter() - t)
            if interp is not None:
                t = time.perf_counter()
                out = interp.interpolate(lr_hu, r)
                preds["acvtt"] = (normalise_hu(out), time.perf_counter() - t)
            for method, (pred, secs) in preds.items():
                m = paper_metrics(pred, gt, r)
                rows.append(
                    {
                        "case": name,
                        "factor": r,
                        "method": method,
                        "seconds": secs,
                        "shape_lr": list(lr.shape),
                        **m,
                    }
                )
    return {
        "rows": rows,
        "summary": summarise(rows),
        "skipped": skipped,
        "degradation": degradation,
    }


def gains_over_best_baseline(rows: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """ACVTT's PSNR gain (dB) over the better of linear and cubic, per (case, factor) evaluated."""
    psnr = {(x["case"], x["factor"], x["method"]): x["psnr"] for x in rows}
    return {
        (case, r): p - max(psnr[case, r, "linear"], psnr[case, r, "cubic"])
        for (case, r, method), p in psnr.items()
        if method == "acvtt"
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean metrics per factor and method, and ACVTT's PSNR gain over the better baseline."""
    out: dict[str, Any] = {}
    all_gains = gains_over_best_baseline(rows)
    for r in sorted({row["factor"] for row in rows}):
        per: dict[str, Any] = {}
        for method in METHODS:
            sel = [x for x in rows if x["factor"] == r and x["method"] == method]
            if sel:
                per[method] = {k: float(np.mean([x[k] for x in sel])) for k in METRICS}
        gains = [g for (_, f), g in all_gains.items() if f == r]
        if gains:
            per["acvtt_gain_db_vs_best_baseline"] = {
                "mean": float(np.mean(gains)),
                "min": float(np.min(gains)),
                "n": len(gains),
            }
        out[f"x{r}"] = per
    return out


def table(result: dict[str, Any]):
    """A rich Table of the rows."""
    from rich.table import Table

    how = {"decimate": "paper protocol, LR = HR[::R]", "slab": "slab-averaged LR (box profile)"}
    deg = result.get("degradation", "decimate")
    t = Table(
        title=f"ACVTT eval, {how.get(deg, deg)} (PSNR dB, data range 1; 5 slices dropped per end)"
    )
    for col in (
        "case",
        "factor",
        "method",
        "PSNR",
        "SSIM 3D",
        "PSNR synth",
        "SSIM ax/cor/sag",
        "s",
    ):
        t.add_column(col)
    for x in result["rows"]:
        t.add_row(
            x["case"],
            f"x{x['factor']}",
            x["method"],
            f"{x['psnr']:.2f}",
            f"{x['ssim']:.4f}",
            f"{x['psnr_synth']:.2f}",
            f"{x['ssim_axial']:.4f}/{x['ssim_coronal']:.4f}/{x['ssim_sagittal']:.4f}",
            f"{x['seconds']:.1f}",
        )
    return t
