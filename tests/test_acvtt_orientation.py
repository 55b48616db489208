"""`acvtt interpolate` keeps the input's layout whatever its orientation (issue 15, part 1).

Every input is a small real CT crop stored in one orientation: the output must keep the input's
array order, direction and origin (only the slice spacing becomes spacing/R and the count
(d-1)R+1), with out[k*R] == in[k]. The model's slice order is internal: twins that hold the same
voxels give the same voxels back. NIfTI, NRRD and a DICOM folder written with SimpleITK.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from acvtt_core.checkpoint import CheckpointMeta, save_checkpoint
from acvtt_core.config import ModelConfig
from acvtt_core.model import ACVTT

sitk = pytest.importorskip("SimpleITK")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

R = 3
SPACING = (0.8, 0.9, 4.5)
ORIGIN = (-20.0, 35.0, -700.0)
SIGNS = list(itertools.product((1, -1), repeat=3))  # (x, y, z) axis signs: 8 directions


@pytest.fixture(scope="module")
def real_crop(sample_data) -> np.ndarray:
    """(D, H, W) int16 HU: every 3rd slice of a crop of the real spine CT (a 4.5 mm 'thick' CT)."""
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data.spine_ct)))
    return np.ascontiguousarray(arr[:31:3, 4:40, 10:52]).astype(np.int16)  # (11, 36, 42)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small model with every weight perturbed, so that its output is not linear
    interpolation (which would look the same in every orientation) and not symmetric."""
    torch.manual_seed(0)
    cfg = ModelConfig(width=4, n_refs=2, mrnla_levels=(0,), fusion_width=4)
    m = ACVTT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    meta = CheckpointMeta(preset="tiny", model=cfg, factors=[R])
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.safetensors", m, meta)


def _image(arr: np.ndarray, direction: np.ndarray, origin=ORIGIN, spacing=SPACING):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetDirection(tuple(float(v) for v in np.asarray(direction, float).ravel()))
    return img


def _twin(base: np.ndarray, signs, spacing=SPACING) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The base volume (identity direction, ORIGIN) stored with axis signs `signs` (x, y, z):
    the array flipped along every negated axis, the origin moved to the voxel that is now first,
    so every voxel keeps its physical position. Returns (array, direction, origin)."""
    flip_axes = tuple(2 - i for i, s in enumerate(signs) if s < 0)  # (x, y, z) -> array (2, 1, 0)
    arr = np.ascontiguousarray(np.flip(base, flip_axes)) if flip_axes else base
    size = (base.shape[2], base.shape[1], base.shape[0])
    origin = [
        o + (n - 1) * sp if s < 0 else o
        for o, n, sp, s in zip(ORIGIN, size, spacing, signs, strict=True)
    ]
    return arr, np.diag(np.asarray(signs, float)), np.asarray(origin)


def _interpolate(src: Path, out: Path, checkpoint: Path, capsys) -> None:
    from acvtt_core.cli import main

    argv = ["interpolate", str(src), str(out), "--factor", str(R), "--checkpoint", str(checkpoint)]
    with pytest.raises(SystemExit) as ex:
        main([*argv, "--device", "cpu"])
    assert ex.value.code == 0, capsys.readouterr().err


def _check_layout(inp, out) -> np.ndarray:
    """The output keeps the input's layout; returns the output array."""
    a, b = sitk.GetArrayFromImage(inp), sitk.GetArrayFromImage(out)
    assert b.shape == ((a.shape[0] - 1) * R + 1, *a.shape[1:])
    np.testing.assert_array_equal(b[::R], a)  # out[k*R] == in[k]
    np.testing.assert_allclose(out.GetDirection(), inp.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), inp.GetOrigin(), atol=1e-4)
    sx, sy, sz = inp.GetSpacing()
    np.testing.assert_allclose(out.GetSpacing(), (sx, sy, sz / R), rtol=1e-6)
    for k in (0, a.shape[0] - 1):  # slice k*R lies where input slice k lies
        np.testing.assert_allclose(
            out.TransformIndexToPhysicalPoint((0, 0, k * R)),
            inp.TransformIndexToPhysicalPoint((0, 0, k)),
            atol=1e-3,
        )
    return b


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_every_axis_sign_keeps_the_input_layout(real_crop, checkpoint, tmp_path, capsys, ext):
    """All 8 sign combinations of the three axes. Besides the layout: each result, flipped back
    into the identity frame, is the same voxels whatever the z sign (twins that differ only in
    the slice axis are the same volume, and the model sees them in the same order)."""
    back = {}
    for signs in SIGNS:
        arr, direction, origin = _twin(real_crop, signs)
        name = "".join("p" if s > 0 else "m" for s in signs)
        src, dst = tmp_path / f"in_{name}{ext}", tmp_path / f"out_{name}{ext}"
        sitk.WriteImage(_image(arr, direction, origin), str(src))
        _interpolate(src, dst, checkpoint, capsys)
        inp, out = sitk.ReadImage(str(src)), sitk.ReadImage(str(dst))
        res = _check_layout(inp, out)
        flip_axes = tuple(2 - i for i, s in enumerate(signs) if s < 0)
        back[signs] = np.flip(res, flip_axes) if flip_axes else res
    for sx, sy in itertools.product((1, -1), repeat=2):
        np.testing.assert_array_equal(back[(sx, sy, 1)], back[(sx, sy, -1)])
    # The model is not symmetric: the result is not simply linear interpolation.
    lin = back[(1, 1, 1)][1::R].astype(np.float32)
    guess = (2 * real_crop[:-1].astype(np.float32) + real_crop[1:]) / 3
    assert np.abs(lin - guess).max() > 1


@pytest.mark.parametrize(
    "direction",
    [
        ((0, 0, -1), (1, 0, 0), (0, -1, 0)),  # sagittal stack (the spine CT's own), det +1
        ((0, 1, 0), (1, 0, 0), (0, 0, 1)),  # x and y swapped, det -1
    ],
)
@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_permuted_direction_keeps_the_input_layout(
    real_crop, checkpoint, tmp_path, capsys, direction, ext
):
    src, dst = tmp_path / f"in{ext}", tmp_path / f"out{ext}"
    sitk.WriteImage(_image(real_crop, np.asarray(direction, float)), str(src))
    _interpolate(src, dst, checkpoint, capsys)
    _check_layout(sitk.ReadImage(str(src)), sitk.ReadImage(str(dst)))


def _write_dicom_series(arr: np.ndarray, direction: np.ndarray, folder: Path, descending: bool):
    """One CT slice file per array slice with the geometry of `direction` (row cosine = column
    0, column cosine = column 1, slices stepping along column 2). `descending` numbers the
    files (InstanceNumber) from the last slice, as many head-first CTs are numbered."""
    folder.mkdir()
    vol = _image(arr, direction)
    d = np.asarray(direction, float)
    iop = "\\".join(f"{v:.6f}" for v in (*d[:, 0], *d[:, 1]))
    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = arr.shape[0]
    for k in range(n):
        sl = sitk.GetImageFromArray(arr[k : k + 1])
        ipp = vol.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"1.2.826.0.1.3680043.8.498.3.{k + 1}",
            "0020|000d": study,
            "0020|000e": series,
            "0020|0013": str(n - k if descending else k + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in ipp),
            "0020|0037": iop,
            "0028|0030": f"{SPACING[1]}\\{SPACING[0]}",
            "0018|0050": str(SPACING[2]),
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


@pytest.mark.parametrize(
    "row,col,descending",
    [
        ((1, 0, 0), (0, 1, 0), False),  # head-first supine
        ((1, 0, 0), (0, 1, 0), True),  # numbered from the head down
        ((-1, 0, 0), (0, 1, 0), False),  # feet-first: rows point the other way
        ((-1, 0, 0), (0, -1, 0), True),  # cosines -1\0\0\0\-1\0
        ((1, 0, 0), (0, 0, -1), False),  # coronal slices
    ],
)
def test_dicom_folder_keeps_the_input_layout(
    real_crop, checkpoint, tmp_path, capsys, row, col, descending
):
    d = np.column_stack([row, col, np.cross(row, col)]).astype(float)
    _write_dicom_series(real_crop, d, tmp_path / "series", descending)
    dst = tmp_path / "out.nii.gz"
    _interpolate(tmp_path / "series", dst, checkpoint, capsys)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    inp = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(inp), real_crop)  # files round-trip
    _check_layout(inp, sitk.ReadImage(str(dst)))


def test_eval_same_numbers_for_a_volume_and_its_flipped_twin(
    sample_data, checkpoint, tmp_path, capsys
):
    """`acvtt eval` on a thin real crop and on its twin stored with the slice axis flipped (NRRD,
    direction diag(1, 1, -1), origin at the other end): the same numbers."""
    from acvtt_core.cli import main

    thin = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data.spine_ct)))[:25, 4:40, 10:52]
    thin = np.ascontiguousarray(thin).astype(np.int16)
    results = []
    for signs, ext in (((1, 1, 1), ".nii.gz"), ((1, 1, -1), ".nrrd")):
        arr, direction, origin = _twin(thin, signs, (0.8, 0.9, 1.5))
        src = tmp_path / f"case{ext}"
        sitk.WriteImage(_image(arr, direction, origin, (0.8, 0.9, 1.5)), str(src))
        out = tmp_path / f"eval{ext}.json"
        argv = ["eval", "--data", src, "--factor", "2", "--factor", "3", "--device", "cpu"]
        with pytest.raises(SystemExit) as ex:
            main([str(a) for a in [*argv, "--checkpoint", checkpoint, "--out", out]])
        assert ex.value.code == 0, capsys.readouterr().err
        rows = json.loads(out.read_text())["rows"]
        results.append([{k: v for k, v in r.items() if k != "seconds"} for r in rows])
    assert len(results[0]) == 6  # 2 factors x (linear, cubic, acvtt)
    assert results[0] == results[1]
