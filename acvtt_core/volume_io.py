"""Read and write volumes with SimpleITK (NIfTI, NRRD, MHA, ... and DICOM series folders).

SimpleITK is imported lazily so that the rest of acvtt_core works without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """SimpleITK geometry in (x, y, z) order."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def upsampled_z(self, factor: int) -> Geometry:
        """Geometry of the volume with factor x more slices: same origin and direction, z spacing
        divided, so that new slice k*factor lies on old slice k."""
        sx, sy, sz = self.spacing
        return Geometry((sx, sy, sz / factor), self.origin, self.direction)

    @property
    def slices_ascend_along_normal(self) -> bool:
        """True when slice index k runs along the slice normal (row direction x column
        direction), i.e. the direction matrix has a positive determinant."""
        return float(np.linalg.det(np.asarray(self.direction, float).reshape(3, 3))) > 0

    def slices_reversed(self, depth: int) -> Geometry:
        """Geometry of the same voxels with the slice axis (of `depth` slices) reversed: the
        origin moves to the last slice and the slice direction flips."""
        d = np.asarray(self.direction, float).reshape(3, 3)
        origin = np.asarray(self.origin, float) + d[:, 2] * self.spacing[2] * (depth - 1)
        d[:, 2] *= -1
        return Geometry(self.spacing, tuple(float(v) for v in origin), tuple(d.ravel().tolist()))


VOLUME_EXTS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def find_volumes(path: Path) -> list[Path]:
    """The volumes `path` names: itself if it is a file or a DICOM series folder (it holds .dcm
    or extension-less files), else the volume files (NIfTI, NRRD, MHA) and the non-empty
    folders (DICOM series) directly in it."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    files = [p for p in path.iterdir() if p.is_file()]
    if any(p.suffix.lower() in (".dcm", "") for p in files):
        return [path]
    found = sorted(p for p in files if p.name.endswith(VOLUME_EXTS))
    dirs = sorted(p for p in path.iterdir() if p.is_dir() and any(f.is_file() for f in p.iterdir()))
    return found + dirs


def _sitk():
    import SimpleITK as sitk

    return sitk


def read_volume(path: str | Path, as_stored: bool = False) -> tuple[np.ndarray, Geometry]:
    """Read a volume file or a DICOM series folder. Returns (array (D, H, W), geometry). For a
    folder holding several series, the series with the most files is read (SimpleITK sorts its
    slices along the normal).

    By default slices come ascending along the slice normal, the order ACVTT models are trained in
    and are not symmetric to (docs/MODEL.md, "Slice order"): a file stored the other way round is
    returned reversed, with its geometry adjusted so that every voxel keeps its position. With
    `as_stored` the array and geometry are the file's own (for writing a result in the input's
    layout; `Geometry.slices_ascend_along_normal` then says which order the model needs)."""
    sitk = _sitk()
    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        ids = reader.GetGDCMSeriesIDs(str(path))
        if not ids:
            raise ValueError(f"no DICOM series found in {path}")
        files = max((reader.GetGDCMSeriesFileNames(str(path), sid) for sid in ids), key=len)
        reader.SetFileNames(files)
        img = reader.Execute()
    elif path.exists():
        img = sitk.ReadImage(str(path))
    else:
        raise FileNotFoundError(f"no such volume: {path}")
    if img.GetDimension() != 3:
        raise ValueError(f"{path}: expected a 3D volume, got {img.GetDimension()}D")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: expected a scalar volume")
    geom = Geometry(tuple(img.GetSpacing()), tuple(img.GetOrigin()), tuple(img.GetDirection()))
    vol = sitk.GetArrayFromImage(img)
    if not as_stored and not geom.slices_ascend_along_normal:
        return np.ascontiguousarray(vol[::-1]), geom.slices_reversed(vol.shape[0])
    return vol, geom


def to_int16_hu(vol: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(vol), -32768, 32767).astype(np.int16)


def write_volume(path: str | Path, vol: np.ndarray, geom: Geometry, compress: bool = True) -> None:
    sitk = _sitk()
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing(geom.spacing)
    img.SetOrigin(geom.origin)
    img.SetDirection(geom.direction)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), compress)
