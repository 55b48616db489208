"""Derived-series geometry for patient positions, flipped cosines and both slice orders.

Each variant is the real 20-slice CT with rewritten headers (orientation, position, patient
position, numbering; the pixels are the real ones, stored uncompressed). The node's own steps
(plan -> load -> interpolate in model order -> write) run on it with linear interpolation, and
one variant goes through the pipeline's worker. Every result must pass dciodvfy and dcentvfy, put
derived slice k*R exactly on source slice k (position and pixels), keep the source's orientation
and have spacing = source spacing / R.
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.infer import interpolate_in_model_order
from dicom_node.jobs import derived_dir_path
from dicom_node.load import load_series
from dicom_node.plan import SeriesPlan, plan_slices
from dicom_node.slices import slice_refs_from_file
from dicom_node.write import SourceImage, write_derived_series
from tests.test_pipeline import LinearStandIn, _index, _run_next, env  # noqa: F401
from tests.test_write import MODEL, dcentvfy_errors, dciodvfy_errors

FACTOR = 2

# name: (ImageOrientationPatient, PatientPosition, number the slices feet to head, plan ascends
# along the normal). The sample itself is head-first supine numbered head to feet.
VARIANTS = {
    "hfs_numbered_head_down": ([1, 0, 0, 0, 1, 0], "HFS", False, False),
    "hfs_numbered_feet_up": ([1, 0, 0, 0, 1, 0], "HFS", True, True),
    "ffs": ([-1, 0, 0, 0, 1, 0], "FFS", True, False),
    "hfp_cosines_reversed": ([-1, 0, 0, 0, -1, 0], "HFP", False, False),
    "ffp": ([1, 0, 0, 0, -1, 0], "FFP", False, True),
}


@pytest.fixture(scope="module")
def uncompressed_series(sample_data) -> list[Dataset]:
    """The real series with its pixels decoded once (so each variant loads fast)."""
    datasets = []
    for path in sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.decompress()
        datasets.append(ds)
    assert len(datasets) == 20
    return datasets


def write_variant(series: list[Dataset], name: str, folder: Path) -> list[Path]:
    """Save the series with the variant's headers. The field of view keeps its centre; with the
    cosines reversed the first pixel lies at the opposite corner."""
    iop, patient_position, feet_up, _ = VARIANTS[name]
    row, col = np.array(iop[:3], float), np.array(iop[3:], float)
    numbers = sorted(int(ds.InstanceNumber) for ds in series)
    folder.mkdir(parents=True)
    paths = []
    for src in series:
        ds = deepcopy(src)
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        half_w, half_h = (ds.Columns - 1) * col_mm / 2, (ds.Rows - 1) * row_mm / 2
        centre = np.array([x + half_w, y + half_h, z])  # the sample's cosines are 1\0\0\0\1\0
        ipp = centre - row * half_w - col * half_h
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = iop
        ds.PatientPosition = patient_position
        if feet_up:
            ds.InstanceNumber = numbers[0] + numbers[-1] - int(ds.InstanceNumber)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def plan_of(paths: list[Path]) -> SeriesPlan:
    plan = plan_slices("variant", [r for p in paths for r in slice_refs_from_file(p)])
    assert isinstance(plan, SeriesPlan), plan
    return plan


def check_geometry(plan: SeriesPlan, derived_paths: list[Path], source_paths: list[Path]) -> None:
    """dciodvfy/dcentvfy clean; slice k*R on source k (plan order) in position and pixels; the
    source's orientation; spacing / R between neighbours, in the plan's direction."""
    for path in derived_paths:
        assert dciodvfy_errors(path) == [], path
    assert dcentvfy_errors(source_paths + derived_paths) == []
    derived = sorted((pydicom.dcmread(p) for p in derived_paths), key=lambda d: d.InstanceNumber)
    assert len(derived) == (plan.n_slices - 1) * FACTOR + 1
    sources = [pydicom.dcmread(ref.file_path) for ref in plan.slices]

    def ipp(ds: Dataset) -> np.ndarray:
        return np.array([float(v) for v in ds.ImagePositionPatient])

    for k, src in enumerate(sources):
        on = derived[k * FACTOR]
        np.testing.assert_allclose(ipp(on), ipp(src), atol=1e-3)
        np.testing.assert_array_equal(on.pixel_array, src.pixel_array)
        if k + 1 < len(sources):  # halfway to the next source, in position and in value
            mid = derived[k * FACTOR + 1]
            np.testing.assert_allclose(ipp(mid), (ipp(src) + ipp(sources[k + 1])) / 2, atol=1e-3)
            mean = (src.pixel_array.astype(float) + sources[k + 1].pixel_array) / 2
            assert np.abs(mid.pixel_array - mean).max() <= 0.5
    step = np.array(plan.slice_vector) / FACTOR
    for a, b in zip(derived, derived[1:], strict=False):
        np.testing.assert_allclose(ipp(b) - ipp(a), step, atol=1e-3)
    for d in derived:
        np.testing.assert_allclose(
            [float(v) for v in d.ImageOrientationPatient],
            [float(v) for v in sources[0].ImageOrientationPatient],
        )
        assert float(d.SpacingBetweenSlices) == pytest.approx(plan.spacing_mm / FACTOR)
        assert float(d.SliceThickness) == pytest.approx(plan.spacing_mm / FACTOR)
        assert d.PatientPosition == sources[0].PatientPosition


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_node_steps_keep_geometry(uncompressed_series, tmp_path, name):
    paths = write_variant(uncompressed_series, name, tmp_path / "src")
    plan = plan_of(paths)
    assert plan.ascending_along_normal is VARIANTS[name][3]
    assert plan.spacing_mm == pytest.approx(2.0)
    loaded = load_series(plan)
    volume = interpolate_in_model_order(
        LinearStandIn(), loaded.volume, FACTOR, ascending=plan.ascending_along_normal
    )
    derived = write_derived_series(
        [SourceImage(ds, ref.frame) for ref, ds in zip(plan.slices, loaded.headers, strict=True)],
        volume,
        factor=FACTOR,
        out_dir=tmp_path / "out",
        slice_vector=plan.slice_vector,
        spacing_mm=plan.spacing_mm,
        **MODEL,
    )
    check_geometry(plan, [Path(ds.filename) for ds in derived.datasets], paths)


def test_feet_first_series_through_the_pipeline(env, uncompressed_series, tmp_path):  # noqa: F811
    config, sessions, pipeline, _, _ = env
    paths = write_variant(uncompressed_series, "ffs", tmp_path / "src")
    _index(sessions, config, paths)
    pipeline.check_completion()
    job = _run_next(pipeline, sessions)
    derived = sorted(derived_dir_path(job, config.storage.spool_root).glob("*.dcm"))
    check_geometry(plan_of(paths), derived, paths)
