"""Volume-level helpers: HU normalisation, synthetic z decimation, corner-aligned z upsampling,
the cubic baseline and the body bounding box. Arrays are (D, H, W) with axial slices on axis 0."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from acvtt_core.config import HU_MAX, HU_MIN

HU_RANGE = HU_MAX - HU_MIN


def normalise_hu(hu: np.ndarray) -> np.ndarray:
    """Clip HU to [-1024, 3071] and map linearly to [0, 1] (float32)."""
    x = np.asarray(hu, dtype=np.float32)
    return ((np.clip(x, HU_MIN, HU_MAX) - HU_MIN) / HU_RANGE).astype(np.float32, copy=False)


def denormalise_hu(x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, dtype=np.float32) * HU_RANGE + HU_MIN).astype(np.float32, copy=False)


def output_depth(d: int, factor: int) -> int:
    return (d - 1) * factor + 1


def trim_for_factor(hr: np.ndarray, factor: int) -> np.ndarray:
    """Drop trailing slices so that (D - 1) % factor == 0."""
    d = hr.shape[0]
    return hr[: (d - 1) // factor * factor + 1]


def decimate(hr: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic thick volume by z decimation. Returns (trimmed HR, LR = HR[::factor])."""
    hr = trim_for_factor(hr, factor)
    return hr, hr[::factor]


def linear_upsample_z(vol, factor: int):
    """Corner-aligned linear interpolation along axis 0: out[k*factor] == vol[k]. Takes a numpy
    array or a torch tensor (any device) and returns the same kind, float32; both give the same
    values (the weights are float32 in both)."""
    if factor < 1:
        raise ValueError("factor must be >= 1")
    if hasattr(vol, "new_empty"):  # a torch tensor: stays on its device (training samplers)
        vol = vol.float()
        out = vol.new_empty((output_depth(vol.shape[0], factor), *vol.shape[1:]))
    else:
        vol = np.asarray(vol, dtype=np.float32)
        out = np.empty((output_depth(vol.shape[0], factor), *vol.shape[1:]), dtype=np.float32)
    out[::factor] = vol
    for j in range(1, factor):
        t = np.float32(j / factor)
        out[j::factor] = float(1 - t) * vol[:-1] + float(t) * vol[1:]
    return out


def cubic_upsample_z(vol: np.ndarray, factor: int, chunk: int = 64) -> np.ndarray:
    """Corner-aligned cubic-spline interpolation along axis 0 (the paper's 'bicubic' baseline in
    z); passes through the input slices. Needs D >= 4, falls back to linear below that."""
    from scipy.interpolate import CubicSpline

    vol = np.asarray(vol, dtype=np.float32)
    d = vol.shape[0]
    if d < 4:
        return linear_upsample_z(vol, factor)
    z = np.arange(d, dtype=np.float64)
    zo = np.arange(output_depth(d, factor), dtype=np.float64) / factor
    out = np.empty((zo.size, *vol.shape[1:]), dtype=np.float32)
    for y0 in range(0, vol.shape[1], chunk):
        out[:, y0 : y0 + chunk] = CubicSpline(z, vol[:, y0 : y0 + chunk], axis=0)(zo)
    out[::factor] = vol
    return out


@dataclass(frozen=True)
class BBox:
    """In-plane box [y0, y1) x [x0, x1)."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


def body_bbox(
    vol_hu: np.ndarray, threshold_hu: float = -500.0, min_fraction: float = 0.02, margin: int = 8
) -> BBox:
    """In-plane bounding box of the body: pixels above `threshold_hu` in at least `min_fraction`
    of the slices, grown by `margin` pixels. The whole plane if nothing passes."""
    d, h, w = vol_hu.shape
    step = max(1, d // 64)  # a subset of slices is plenty for a bounding box
    frac = (np.asarray(vol_hu[::step]) > threshold_hu).mean(axis=0)
    mask = frac >= min_fraction
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return BBox(0, h, 0, w)
    return BBox(
        int(max(0, rows[0] - margin)),
        int(min(h, rows[-1] + 1 + margin)),
        int(max(0, cols[0] - margin)),
        int(min(w, cols[-1] + 1 + margin)),
    )


def reference_indices(d: int, n_refs: int) -> list[int]:
    """R axial slice indices spaced uniformly over a volume of depth d (bin centres)."""
    return [min(d - 1, int((i + 0.5) * d / n_refs)) for i in range(n_refs)]
