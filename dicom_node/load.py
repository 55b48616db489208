"""Load a planned series' pixels as a float32 HU volume, in plan order.

Any transfer syntax pydicom can decode with the installed plugins works: uncompressed, JPEG
2000 (pylibjpeg-openjpeg), JPEG lossless / JPEG-LS (pylibjpeg-libjpeg), RLE (pylibjpeg-rle or
pydicom's own decoder). Stored values become HU with RescaleSlope/RescaleIntercept: the
instance's, or for multi-frame images the frame's Pixel Value Transformation functional group.
The headers (pixel data dropped) come back too, because the writer copies attributes from them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicom_node.complete import SeriesPlan, SliceRef, functional_group_item

__all__ = ["LoadError", "LoadedSeries", "load_series", "rescale_for"]


class LoadError(RuntimeError):
    """A source file could not be read or decoded; the message names the slice."""


@dataclass
class LoadedSeries:
    """``volume`` is (D, H, W) float32 HU with ``volume[k]`` = ``plan.slices[k]``; ``headers[k]``
    is that slice's dataset without pixel data (the same object for frames of one file)."""

    volume: np.ndarray
    headers: list[Dataset]


def rescale_for(ds: Dataset, frame: int | None) -> tuple[float, float]:
    """(slope, intercept) of one slice; multi-frame uses the frame's functional group."""
    item: Dataset | None = None
    if frame is not None:
        item = functional_group_item(ds, frame, "PixelValueTransformationSequence")
    src = item if item is not None else ds
    slope = src.get("RescaleSlope", 1)
    intercept = src.get("RescaleIntercept", 0)
    return (
        float(slope) if slope not in (None, "") else 1.0,
        float(intercept) if intercept not in (None, "") else 0.0,
    )


def _read(path: str) -> tuple[Dataset, np.ndarray]:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if "PixelData" in ds:
        del ds.PixelData
    return ds, arr


def load_series(
    plan: SeriesPlan,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoadedSeries:
    """Decode every slice of ``plan`` into HU. Files are decoded in parallel threads (the
    decoders release the GIL for most of their work). Raises :class:`LoadError`."""
    paths = list(dict.fromkeys(s.file_path for s in plan.slices))
    workers = workers or min(len(paths), os.cpu_count() or 1, 8) or 1
    decoded: dict[str, tuple[Dataset, np.ndarray]] = {}

    def one(path: str) -> tuple[str, Dataset, np.ndarray]:
        try:
            ds, arr = _read(path)
        except Exception as exc:  # decoder errors come in many types
            raise LoadError(f"cannot decode {os.path.basename(path)}: {exc}") from exc
        return path, ds, arr

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, (path, ds, arr) in enumerate(pool.map(one, paths), 1):
            decoded[path] = (ds, arr)
            if progress is not None:
                progress(i, len(paths))

    volume = np.empty((plan.n_slices, plan.rows, plan.columns), dtype=np.float32)
    headers: list[Dataset] = []
    for k, ref in enumerate(plan.slices):
        ds, arr = decoded[ref.file_path]
        volume[k] = _slice_hu(ref, ds, arr, plan)
        headers.append(ds)
    return LoadedSeries(volume=volume, headers=headers)


def _slice_hu(ref: SliceRef, ds: Dataset, arr: np.ndarray, plan: SeriesPlan) -> np.ndarray:
    img = arr[ref.frame] if ref.frame is not None and arr.ndim == 3 else arr
    if img.ndim != 2 or img.shape != (plan.rows, plan.columns):
        raise LoadError(
            f"slice {ref.label}: pixel array of shape {img.shape}, expected "
            f"({plan.rows}, {plan.columns}) (colour or inconsistent image?)"
        )
    slope, intercept = rescale_for(ds, ref.frame)
    return img.astype(np.float32) * np.float32(slope) + np.float32(intercept)
