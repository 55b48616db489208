"""Geometry values that make no sense are rejected at completion, naming the value (issue 10,
defect 5): hand-computed cases for the pure checks, the plan on real headers with one value
broken, and a real node that ends such a series ``rejected`` with the reason.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pydicom
import pytest

from dicom_node.geometry import GeometryError, orientation_problem, plane_problem, slice_normal
from dicom_node.plan import Rejection, SeriesPlan, plan_slices
from dicom_node.slices import SliceRef
from tests.support.node import PROCESS_CT_NOWHERE, NodeProcess, send_with_storescu
from tests.support.polling import wait_until

AXIAL = [1, 0, 0, 0, 1, 0]

# -- the pure checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"pixel_spacing": [0, 0]}, "PixelSpacing [0, 0] of slice #3 is not positive"),
        ({"pixel_spacing": [-1, -1]}, "PixelSpacing [-1, -1] of slice #3 is not positive"),
        ({"pixel_spacing": [0.5, 0]}, "PixelSpacing [0.5, 0] of slice #3 is not positive"),
        ({"pixel_spacing": [math.nan, 1]}, "PixelSpacing [nan, 1] of slice #3 is not finite"),
        (
            {"position": [-249.5, math.nan, 10]},
            "ImagePositionPatient [-249.5, nan, 10] of slice #3 is not finite",
        ),
        (
            {"position": [0, 0, math.inf]},
            "ImagePositionPatient [0, 0, inf] of slice #3 is not finite",
        ),
        ({"slice_thickness": -5.0}, "SliceThickness -5 of slice #3 is negative"),
        ({"slice_thickness": math.inf}, "SliceThickness inf of slice #3 is not finite"),
        (
            {"orientation": [0, 0, 0, 0, 0, 0]},
            "ImageOrientationPatient [0, 0, 0, 0, 0, 0] of slice #3: the row cosines have "
            "length 0, not 1",
        ),
        (
            {"orientation": [1, 0, 0, 0, 2, 0]},
            "ImageOrientationPatient [1, 0, 0, 0, 2, 0] of slice #3: the column cosines have "
            "length 2, not 1",
        ),
        # column (0.6, 0.8, 0): unit length, 53.13 degrees from the row (1, 0, 0)
        (
            {"orientation": [1, 0, 0, 0.6, 0.8, 0]},
            "ImageOrientationPatient [1, 0, 0, 0.6, 0.8, 0] of slice #3: row and column are not "
            "orthogonal (53.13 degrees apart)",
        ),
        (
            {"orientation": [1, 0, 0, 1, 0, 0]},
            "ImageOrientationPatient [1, 0, 0, 1, 0, 0] of slice #3: row and column are not "
            "orthogonal (0.00 degrees apart)",
        ),
    ],
)
def test_plane_problem_names_the_value(kwargs, reason):
    assert plane_problem("slice #3", **kwargs) == reason


def test_sane_planes_pass():
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    rounded = [1, 0, 0, 0, round(c, 5), round(s, 5)]  # DS rounding stays within tolerance
    assert plane_problem(
        "slice #1",
        position=[-249.5, -437.5, -766.5],
        orientation=rounded,
        pixel_spacing=[0.9765625, 0.9765625],
        slice_thickness=0.0,
    ) is None  # fmt: skip
    assert plane_problem("slice #1") is None  # absent values are the caller's business
    assert orientation_problem(AXIAL) is None


def test_slice_normal_raises_with_the_reason():
    with pytest.raises(GeometryError, match=r"\[0, 0, 0, 0, 0, 0\]: the row cosines have length 0"):
        slice_normal([0, 0, 0, 0, 0, 0])


# -- the plan, on real headers -------------------------------------------------------------------


def _headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]


def _plan(headers: list[pydicom.Dataset]):
    refs = [r for i, ds in enumerate(headers) for r in SliceRef.from_dataset(ds, f"s/{i}.dcm")]
    return plan_slices("1.2.3", refs)


def _set(ds: pydicom.Dataset, keyword: str, value) -> None:
    with warnings.catch_warnings():  # pydicom warns that nan/inf are not valid DS: that's the point
        warnings.simplefilter("ignore")
        setattr(ds, keyword, value)


def test_real_ct5n_plans_as_it_is(sample_data):
    assert isinstance(_plan(_headers(sample_data.pydicom_ct5n)), SeriesPlan)


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        ("PixelSpacing", [0, 0], "PixelSpacing [0, 0] of slice #{n} is not positive"),
        ("PixelSpacing", [-1, -1], "PixelSpacing [-1, -1] of slice #{n} is not positive"),
        ("SliceThickness", -2.5, "SliceThickness -2.5 of slice #{n} is negative"),
        ("ImageOrientationPatient", [0] * 6, "ImageOrientationPatient [0, 0, 0, 0, 0, 0] of slice"),
        (
            "ImageOrientationPatient",
            [1, 0, 0, 0.6, 0.8, 0],
            "of slice #{n}: row and column are not orthogonal (53.13 degrees apart)",
        ),
    ],
)
def test_every_slice_broken_is_rejected_naming_the_value(sample_data, keyword, value, expected):
    """PixelSpacing [0, 0] on every slice used to give a derived series with PixelSpacing [0, 0]."""
    headers = _headers(sample_data.pydicom_ct5n)
    for ds in headers:
        _set(ds, keyword, value)
    result = _plan(headers)
    assert isinstance(result, Rejection), result
    numbers = {int(ds.InstanceNumber) for ds in headers}
    assert any(expected.format(n=n) in result.reason for n in numbers), result.reason


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_one_position_not_finite_is_named_not_called_a_gap(sample_data, bad):
    headers = _headers(sample_data.pydicom_ct5n)
    target = headers[2]
    pos = [float(v) for v in target.ImagePositionPatient]
    _set(target, "ImagePositionPatient", [pos[0], bad, pos[2]])
    result = _plan(headers)
    assert isinstance(result, Rejection), result
    assert "gap" not in result.reason
    assert result.reason.startswith("ImagePositionPatient [")
    assert f"of slice #{int(target.InstanceNumber)} is not finite" in result.reason
    assert f"{bad:g}" in result.reason


def test_one_slice_with_zero_spacing_rejects_the_series(sample_data):
    """Not split off as "another stack" and planned without it: the sender's data are broken."""
    headers = _headers(sample_data.pydicom_ct5n)
    headers[4].PixelSpacing = [0, 0]
    result = _plan(headers)
    assert isinstance(result, Rejection), result
    assert f"PixelSpacing [0, 0] of slice #{int(headers[4].InstanceNumber)}" in result.reason


def test_rows_zero_is_rejected_at_the_plan(sample_data):
    headers = _headers(sample_data.pydicom_ct5n)
    headers[1].Rows = 0
    result = _plan(headers)
    assert isinstance(result, Rejection), result
    assert f"Rows/Columns 0x16 of slice #{int(headers[1].InstanceNumber)}" in result.reason


# -- a real node -------------------------------------------------------------------------------


def test_real_node_rejects_the_series_with_the_value(sample_data, tmp_path):
    """Real CT slices rewritten with PixelSpacing 0 (one series) and one NaN position (another),
    sent with storescu: both are acknowledged (the values are legal DICOM encodings), and both
    series end ``rejected`` at completion with the reason naming the value and the slice."""
    sources = sorted(sample_data.pydicom_ct5n.iterdir())
    series = {}
    for name in ("spacing", "nan"):
        out = tmp_path / name
        out.mkdir()
        series_uid = pydicom.uid.generate_uid()
        files = []
        for i, src in enumerate(sources):
            ds = pydicom.dcmread(src)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            if name == "spacing":
                ds.PixelSpacing = [0, 0]
            elif i == 2:
                pos = [float(v) for v in ds.ImagePositionPatient]
                _set(ds, "ImagePositionPatient", [pos[0], math.nan, pos[2]])
                nan_slice = int(ds.InstanceNumber)
            files.append(out / f"{i}.dcm")
            ds.save_as(files[-1], enforce_file_format=True)
        series[name] = (series_uid, files)

    with NodeProcess(tmp_path / "node", overrides=PROCESS_CT_NOWHERE) as node:
        for _uid, files in series.values():
            sent = send_with_storescu(files, node.port)
            assert sent.acknowledged == set(files), sent.output[-2000:]

        def final(uid: str):
            rows = node.sqlite("select state, state_reason from series where series_uid = ?", uid)
            return rows[0] if rows and rows[0][0] not in ("receiving", "changed") else None

        state, reason = wait_until(lambda: final(series["spacing"][0]), 60, "the series verdict")
        assert state == "rejected", (state, reason)
        assert "PixelSpacing [0, 0] of slice #" in reason and "is not positive" in reason
        state, reason = wait_until(lambda: final(series["nan"][0]), 60, "the series verdict")
        assert state == "rejected", (state, reason)
        assert f"of slice #{nan_slice} is not finite" in reason and "nan" in reason
        assert "gap" not in reason
        assert node.sqlite("select count(*) from jobs") == [(0,)]
