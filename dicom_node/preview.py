"""Per-job preview PNG: coronal and sagittal views, thick input beside derived output (PIL only).

Layout (2 x 2 panels, with a caption strip above each)::

    coronal  thick  |  coronal  derived
    sagittal thick  |  sagittal derived

Both volumes are (z, y, x) arrays in HU, in the series' stacking order; index 0 along z is drawn at
the bottom (for an axial stack sorted along the normal that is the feet end). Each panel is
resampled to square display pixels of the finest in-plane spacing, so proportions are physical:
the thick input with nearest-neighbour (its slabs stay visible), the derived output bilinearly.
The same window is applied to all four panels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["PreviewInfo", "write_preview_png"]

_CAPTION = 14  # pixels above each panel for its label
_GAP = 4
_MAX_PANEL = 512  # longest panel side in pixels, to keep files small


@dataclass(frozen=True)
class PreviewInfo:
    """Where the PNG went, its size, and each panel's (left, top, right, bottom) box."""

    path: Path
    size: tuple[int, int]
    panels: dict[str, tuple[int, int, int, int]]


def _window(img: np.ndarray, center: float, width: float) -> np.ndarray:
    lo = center - width / 2.0
    scaled = (img.astype(np.float64) - lo) / max(width, 1e-6) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _views(vol: np.ndarray) -> dict[str, np.ndarray]:
    z, y, x = vol.shape
    return {
        "coronal": vol[:, y // 2, :][::-1],  # rows: z (top = last slice), cols: x
        "sagittal": vol[:, :, x // 2][::-1],  # rows: z, cols: y
    }


def write_preview_png(
    thick_hu: np.ndarray,
    thin_hu: np.ndarray,
    thick_spacing_zyx: Sequence[float],
    thin_spacing_zyx: Sequence[float],
    path: Path | str,
    window: tuple[float, float] = (40.0, 400.0),
) -> PreviewInfo:
    """Write the coronal/sagittal thick-vs-derived preview to ``path`` and describe it.

    ``window`` is (center, width) in HU. Raises ``ValueError`` for non-3D input.
    """
    thick = np.asarray(thick_hu)
    thin = np.asarray(thin_hu)
    if thick.ndim != 3 or thin.ndim != 3:
        raise ValueError("thick_hu and thin_hu must be 3-D (z, y, x) arrays")
    sp = {
        "thick": [float(v) for v in thick_spacing_zyx],
        "derived": [float(v) for v in thin_spacing_zyx],
    }
    vols = {"thick": thick, "derived": thin}
    pixel_mm = min(min(s[1:]) for s in sp.values())

    # Physical size of each view in mm: (height along z, width along x or y).
    def extent(kind: str, view: str) -> tuple[float, float]:
        v, s = vols[kind], sp[kind]
        across = v.shape[2] * s[2] if view == "coronal" else v.shape[1] * s[1]
        return v.shape[0] * s[0], across

    longest = max(max(extent(k, w)) for k in vols for w in ("coronal", "sagittal"))
    mm_per_px = max(pixel_mm, longest / _MAX_PANEL)

    tiles: dict[str, Image.Image] = {}
    for kind, vol in vols.items():
        for view, img in _views(vol).items():
            h_mm, w_mm = extent(kind, view)
            size = (max(1, round(w_mm / mm_per_px)), max(1, round(h_mm / mm_per_px)))
            resample = Image.Resampling.NEAREST if kind == "thick" else Image.Resampling.BILINEAR
            tiles[f"{view} {kind}"] = Image.fromarray(_window(img, *window)).resize(size, resample)

    col_w = [
        max(tiles[f"{v} {k}"].width for v in ("coronal", "sagittal")) for k in ("thick", "derived")
    ]
    row_h = [
        max(tiles[f"{v} {k}"].height for k in ("thick", "derived")) for v in ("coronal", "sagittal")
    ]
    width = sum(col_w) + 3 * _GAP
    height = sum(row_h) + 2 * _CAPTION + 3 * _GAP
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    panels: dict[str, tuple[int, int, int, int]] = {}
    top = _GAP
    for r, view in enumerate(("coronal", "sagittal")):
        left = _GAP
        for c, kind in enumerate(("thick", "derived")):
            tile = tiles[f"{view} {kind}"]
            label = f"{view} {kind} {sp[kind][0]:g} mm"
            draw.text((left, top), label, fill=255)
            canvas.paste(tile, (left, top + _CAPTION))
            panels[f"{view} {kind}"] = (
                left,
                top + _CAPTION,
                left + tile.width,
                top + _CAPTION + tile.height,
            )
            left += col_w[c] + _GAP
        top += row_h[r] + _CAPTION + _GAP
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG", optimize=True)
    return PreviewInfo(path=out, size=canvas.size, panels=panels)
