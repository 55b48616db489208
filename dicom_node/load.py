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

from dicom_node.header import PixelDataExtent, pixel_problem
from dicom_node.plan import SeriesPlan
from dicom_node.slices import SliceRef, functional_group_item

__all__ = ["LoadError", "LoadedSeries", "SourceUnreadable", "load_series", "rescale_for"]


class LoadError(RuntimeError):
    """A source file could not be read or decoded. The message is a sentence a person reads:
    it says that the whole series is rejected, names the slice by instance number and position
    (never patient data), and why."""


class SourceUnreadable(RuntimeError):
    """A source file cannot be opened at all on this node (gone, a directory in its place, no
    permission): the file system's fault (a shared spool not mounted, or not the same one),
    not the series'. The message names the slice and the operating system's error."""

    def __init__(self, n_files: int, n_total: int, first: str) -> None:
        super().__init__(f"{n_files} of {n_total} source file(s) cannot be read: {first}")
        self.n_files, self.n_total, self.first = n_files, n_total, first


class _Unusable(Exception):
    """Internal: one file cannot give an image; the message is the readable why."""


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


def _extent(ds: Dataset) -> PixelDataExtent | None:
    if "PixelData" not in ds:
        return None
    value = ds.PixelData or b""  # a zero-length value reads as None
    encapsulated = ds.file_meta.TransferSyntaxUID.is_encapsulated
    return PixelDataExtent(len(value), encapsulated, fragments=1 if value else 0)


def _decoder_says(exc: Exception) -> str:
    """The first readable line of a decoder failure (pydicom lists one line per plugin)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[1][:200]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _read(path: str) -> tuple[Dataset, np.ndarray]:
    """Decode one file; raises :class:`_Unusable` with a readable reason."""
    try:
        ds = pydicom.dcmread(path)
    except OSError:
        raise  # the file system's problem, not the data's: load_series says which
    except Exception as exc:
        raise _Unusable(f"its file cannot be read ({_decoder_says(exc)})") from exc
    # The receiver refuses these already; files indexed before it did, or sent in a transfer
    # syntax it does not walk (big endian, deflated), are caught here before the decoder fails
    # with something like "object of type 'NoneType' has no len()".
    problem = pixel_problem(ds, _extent(ds))
    if problem:
        raise _Unusable(problem)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoder errors come in many types
        ts = ds.file_meta.TransferSyntaxUID
        raise _Unusable(
            f"its {ts.name} pixel data cannot be decoded ({_decoder_says(exc)})"
        ) from exc
    del ds.PixelData
    return ds, arr


def _slice_name(ref: SliceRef) -> str:
    """Instance number (or UID tail) and position: enough to find the slice, no patient data."""
    name = f"slice {ref.label}"
    if ref.position is not None:
        name += " at (" + ", ".join(f"{v:.1f}" for v in ref.position) + ") mm"
    return name


def _unusable_error(failed: dict[str, str], plan: SeriesPlan) -> LoadError:
    by_path = {}
    for ref in plan.slices:
        by_path.setdefault(ref.file_path, ref)
    path, why = next(iter(failed.items()))
    more = f" (and {len(failed) - 1} more file(s) that cannot be used)" if len(failed) > 1 else ""
    return LoadError(
        f"the whole series is rejected: {_slice_name(by_path[path])} cannot be used: {why}{more}"
    )


def load_series(
    plan: SeriesPlan,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoadedSeries:
    """Decode every slice of ``plan`` into HU. Files are decoded in parallel threads (the
    decoders release the GIL for most of their work). Raises :class:`SourceUnreadable` when
    a file cannot be opened, else :class:`LoadError` when one cannot be used."""
    paths = list(dict.fromkeys(s.file_path for s in plan.slices))
    workers = workers or min(len(paths), os.cpu_count() or 1, 8) or 1
    decoded: dict[str, tuple[Dataset, np.ndarray]] = {}
    failed: dict[str, str] = {}  # path -> why, in plan order
    unreadable: dict[str, OSError] = {}

    def one(path: str) -> tuple[str, tuple[Dataset, np.ndarray] | str | OSError]:
        try:
            return path, _read(path)
        except _Unusable as exc:
            return path, str(exc)
        except OSError as exc:
            return path, exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, (path, result) in enumerate(pool.map(one, paths), 1):
            if isinstance(result, OSError):
                unreadable[path] = result
            elif isinstance(result, str):
                failed[path] = result
            else:
                decoded[path] = result
            if progress is not None:
                progress(i, len(paths))
    if unreadable:  # before judging the data: the files it would judge are not all there
        path, exc = next(iter(unreadable.items()))
        ref = next(r for r in plan.slices if r.file_path == path)
        raise SourceUnreadable(len(unreadable), len(paths), f"{_slice_name(ref)}: {exc}")
    if failed:  # one broken slice rejects the whole series: the first named, the rest counted
        raise _unusable_error(failed, plan)

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
            f"the whole series is rejected: {_slice_name(ref)} cannot be used: its pixel array "
            f"has shape {img.shape}, expected ({plan.rows}, {plan.columns}) (colour or "
            f"inconsistent image?)"
        )
    slope, intercept = rescale_for(ds, ref.frame)
    return img.astype(np.float32) * np.float32(slope) + np.float32(intercept)
