"""Derived-series writer on the real 20-slice Siemens CT series, validated with dicom3tools."""

from __future__ import annotations

import math
import subprocess
from copy import deepcopy
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.geometry import slice_normal, sort_by_position
from dicom_node.write import (
    DerivedSeriesError,
    derived_series_uid,
    format_ds,
    write_derived_series,
)

DCIODVFY = "/usr/bin/dciodvfy"
DCENTVFY = "/usr/bin/dcentvfy"
CREATED = datetime(2024, 5, 6, 7, 8, 9)
MODEL = {"model_id": "acvtt-test", "model_version": "1.2.3"}


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error")]


def dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    return _errors(proc.stdout + proc.stderr)


def dcentvfy_errors(paths: list[Path]) -> list[str]:
    proc = subprocess.run([DCENTVFY, *map(str, paths)], capture_output=True, text=True, check=False)
    return _errors(proc.stdout + proc.stderr)


def linear_thin(thick: np.ndarray, factor: int) -> np.ndarray:
    """Linear interpolation along axis 0: out[k * factor] == thick[k]."""
    z = np.arange((thick.shape[0] - 1) * factor + 1) / factor
    i0 = np.minimum(np.floor(z).astype(int), thick.shape[0] - 2)
    w = (z - i0)[:, None, None]
    return (thick[i0] * (1 - w) + thick[i0 + 1] * w).astype(np.float32)


@pytest.fixture(scope="module")
def real_series(sample_data) -> tuple[list[Path], list[Dataset], np.ndarray]:
    """Source files, datasets sorted along the normal, and their HU volume."""
    files = sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm"))
    assert len(files) == 20
    datasets = [pydicom.dcmread(f) for f in files]
    normal = slice_normal(datasets[0].ImageOrientationPatient)
    order = sort_by_position([d.ImagePositionPatient for d in datasets], normal).order
    datasets = [datasets[i] for i in order]
    hu = np.stack(
        [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]
    ).astype(np.float32)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    headers = [headers[i] for i in order]
    return [files[i] for i in order], headers, hu


@pytest.mark.parametrize("factor", [2, 3])
def test_real_series_passes_dicom3tools(real_series, tmp_path, factor):
    files, headers, hu = real_series
    thin = linear_thin(hu, factor)
    out = write_derived_series(
        headers, thin, factor=factor, out_dir=tmp_path, created=CREATED, **MODEL
    ).datasets
    n_out = 19 * factor + 1
    assert len(out) == n_out
    written = sorted(tmp_path.glob("*.dcm"))
    assert len(written) == n_out

    for path in written:
        assert dciodvfy_errors(path) == [], path
    assert dcentvfy_errors(files + written) == []

    # Negative control: dcentvfy does report a patient mismatch, so the parse above is real.
    bad = pydicom.dcmread(written[0])
    bad.PatientID = "SOMEONE ELSE"
    bad_path = tmp_path / "bad.dcm.tmp"
    bad.save_as(bad_path)
    assert dcentvfy_errors(files + [bad_path])

    # Re-read what was written: geometry, pixels, identity.
    reread = sorted((pydicom.dcmread(p) for p in written), key=lambda d: int(d.InstanceNumber))
    assert [int(d.InstanceNumber) for d in reread] == list(range(1, n_out + 1))
    spacing = 2.0 / factor
    for k, src in enumerate(headers):
        got = np.array([float(v) for v in reread[k * factor].ImagePositionPatient])
        want = np.array([float(v) for v in src.ImagePositionPatient])
        np.testing.assert_allclose(got, want, atol=1e-3)
    for d in reread:
        assert float(d.SpacingBetweenSlices) == pytest.approx(spacing, abs=1e-6)
        assert float(d.SliceThickness) == pytest.approx(spacing, abs=1e-6)
    z = np.array([float(d.ImagePositionPatient[2]) for d in reread])
    np.testing.assert_allclose(np.diff(z), spacing, atol=1e-4)
    sl = np.array([float(d.SliceLocation) for d in reread])
    np.testing.assert_allclose(sl, z, atol=1e-3)  # source SliceLocation == IPP z here

    clipped = np.clip(np.rint(thin), -1024, 4095 - 1024)  # 12-bit unsigned, intercept -1024
    for k in (0, 1, n_out // 2, n_out - 1):
        d = reread[k]
        back = d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
        assert np.max(np.abs(back - clipped[k])) <= 1.0

    first, src0 = reread[0], headers[0]
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    for kw in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "SpecificCharacterSet"):
        assert first[kw].value == src0[kw].value
    assert first.SeriesInstanceUID != src0.SeriesInstanceUID
    assert first.SeriesNumber == 1000  # the repaired source has an empty SeriesNumber
    assert first.SeriesDescription == f"CT Body 3.0 ACVTT {round(spacing, 4):g}mm"
    assert first.BurnedInAnnotation == "NO"
    assert "Laterality" in first
    assert first.DerivationCodeSequence[0].CodeValue == "113085"
    assert first.ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == (
        "109102"
    )
    # The series-level reference names the source series and only the instances this file was
    # made from: listing the whole series in every file made the writer quadratic.
    for d in reread:
        (ser,) = d.ReferencedSeriesSequence
        assert ser.SeriesInstanceUID == src0.SeriesInstanceUID
        assert [r.ReferencedSOPInstanceUID for r in ser.ReferencedInstanceSequence] == [
            r.ReferencedSOPInstanceUID for r in d.SourceImageSequence
        ]
    for d in reread:
        assert not any(e.tag.is_private for e in d.iterall())
        for kw in ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue"):
            assert kw not in d
        for e in d.iterall():
            if e.VR == "DS" and e.VM:
                values = e.value if e.VM > 1 else [e.value]
                assert all(len(str(v)) <= 16 for v in values), e
    # Slice 1 lies between sources 0 and 1; slice `factor` is exactly source 1.
    refs = [r.ReferencedSOPInstanceUID for r in reread[1].SourceImageSequence]
    assert refs == [headers[0].SOPInstanceUID, headers[1].SOPInstanceUID]
    refs = [r.ReferencedSOPInstanceUID for r in reread[factor].SourceImageSequence]
    assert refs == [headers[1].SOPInstanceUID]
    assert reread[1].SourceImageSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121322"


def test_uids_are_deterministic(real_series):
    _, headers, hu = real_series
    small = hu[:, :8, :8]
    tiny = [deepcopy(h) for h in headers]
    for h in tiny:
        h.Rows, h.Columns = 8, 8
    a = write_derived_series(tiny, linear_thin(small, 2), factor=2, **MODEL).datasets
    b = write_derived_series(tiny, linear_thin(small, 2), factor=2, **MODEL).datasets
    shuffled = write_derived_series(
        tiny, linear_thin(small, 2), factor=2, created=datetime(2030, 1, 1), **MODEL
    ).datasets
    c = write_derived_series(tiny, linear_thin(small, 3), factor=3, **MODEL).datasets
    d = write_derived_series(
        tiny, linear_thin(small, 2), factor=2, model_id="acvtt-test", model_version="9"
    ).datasets
    uids = [x.SOPInstanceUID for x in a]
    assert uids == [x.SOPInstanceUID for x in b] == [x.SOPInstanceUID for x in shuffled]
    assert len(set(uids)) == len(uids)
    assert a[0].SeriesInstanceUID == b[0].SeriesInstanceUID
    assert a[0].SeriesInstanceUID == derived_series_uid(
        headers[0].SeriesInstanceUID,
        [h.SOPInstanceUID for h in reversed(headers)],  # order of the SOP UIDs does not matter
        factor=2,
        **MODEL,
    )
    assert c[0].SeriesInstanceUID != a[0].SeriesInstanceUID
    assert d[0].SeriesInstanceUID != a[0].SeriesInstanceUID
    assert not set(uids) & {x.SOPInstanceUID for x in c}
    assert not set(uids) & {x.SOPInstanceUID for x in d}
    for x in a + c:
        assert len(x.SOPInstanceUID) <= 64 and len(x.SeriesInstanceUID) <= 64


def _synthetic_sources(n: int = 4, *, signed: bool = False, shear_y: float = 0.0) -> list[Dataset]:
    sources = []
    for k in range(n):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.1.{k + 1}"
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.4"
        ds.PatientName = "Müller^Jürgen"
        ds.PatientID = "ÄÖÜ-1"
        ds.Modality = "CT"
        ds.SeriesNumber = 7
        ds.SeriesDescription = "Thorax 5mm"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-100.0, -100.0 + k * shear_y, 50.0 + 5.0 * k]
        ds.PixelSpacing = [0.5, 0.5]
        ds.Rows, ds.Columns = 4, 6
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleSlope = "1"
        ds.RescaleIntercept = "0" if signed else "-1024"
        ds.add_new(0x00090010, "LO", "PRIVATE CREATOR")
        ds.SmallestImagePixelValue = 0
        ds.PixelPaddingValue = 0
        sources.append(ds)
    return sources


def test_character_set_signed_pixels_and_clipping(tmp_path):
    sources = _synthetic_sources(signed=True)
    thick = np.zeros((4, 4, 6), np.float32)
    thick[:, 0, 0] = [-40000, -1000.4, 200.6, 40000]  # out of int16 range at both ends
    thin = linear_thin(thick, 5)
    out = write_derived_series(sources, thin, factor=5, out_dir=tmp_path, **MODEL).datasets
    assert len(out) == 16
    d = pydicom.dcmread(tmp_path / f"{out[0].SOPInstanceUID}.dcm")
    assert d.SpecificCharacterSet == "ISO_IR 100"
    assert str(d.PatientName) == "Müller^Jürgen" and d.PatientID == "ÄÖÜ-1"
    assert d.SeriesNumber == 1007
    assert d.SeriesDescription == "Thorax 5mm ACVTT 1mm"
    assert d.PixelRepresentation == 1 and d.pixel_array.dtype == np.int16
    assert d.pixel_array[0, 0] == -32768
    last = pydicom.dcmread(out[-1].filename)
    assert last.pixel_array[0, 0] == 32767
    mid = pydicom.dcmread(out[5].filename)
    assert mid.pixel_array[0, 0] == -1000  # rint(-1000.4)
    for kw in ("SmallestImagePixelValue", "PixelPaddingValue"):
        assert kw not in d
    assert not any(e.tag.is_private for e in d.iterall())
    assert dciodvfy_errors(tmp_path / f"{out[0].SOPInstanceUID}.dcm") == []


def test_gantry_tilt_follows_real_slice_vector(tmp_path):
    dy = 5.0 * math.tan(math.radians(12))  # y shift per 5 mm slice
    sources = _synthetic_sources(shear_y=dy)
    out = write_derived_series(
        sources, np.zeros((7, 4, 6), np.float32), factor=2, out_dir=tmp_path, **MODEL
    ).datasets
    for k, src in enumerate(sources):
        np.testing.assert_allclose(
            [float(v) for v in out[2 * k].ImagePositionPatient],
            [float(v) for v in src.ImagePositionPatient],
            atol=1e-3,
        )
    np.testing.assert_allclose(
        [float(v) for v in out[1].ImagePositionPatient], [-100.0, -100.0 + dy / 2, 52.5], atol=1e-3
    )
    assert float(out[0].SpacingBetweenSlices) == pytest.approx(2.5)  # between planes, along n


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0, "0"),
        (-0.0, "0"),
        (2.0, "2"),
        (-249.51171875, "-249.51171875"),
        (2 / 3, "0.66666666666667"),
        (-766.5 + 1 / 3, "-766.16666666667"),
        (1e-20, "1e-20"),
        (-1.2345678901234567e20, "-1.2345678901e20"),
    ],
)
def test_format_ds(value, expected):
    s = format_ds(value)
    assert s == expected and len(s) <= 16
    assert float(s) == pytest.approx(value, rel=1e-10, abs=1e-12)


def test_inconsistent_input_is_refused():
    sources = _synthetic_sources()
    with pytest.raises(DerivedSeriesError, match="volume shape"):
        write_derived_series(sources, np.zeros((6, 4, 6)), factor=2, **MODEL)
    with pytest.raises(DerivedSeriesError, match="factor"):
        write_derived_series(sources, np.zeros((4, 4, 6)), factor=0, **MODEL)
    bad = _synthetic_sources()
    bad[2].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(DerivedSeriesError, match="orientation"):
        write_derived_series(bad, np.zeros((7, 4, 6)), factor=2, **MODEL)
    gap = _synthetic_sources()
    gap[3].ImagePositionPatient = [-100.0, -100.0, 80.0]
    with pytest.raises(DerivedSeriesError, match="evenly spaced"):
        write_derived_series(gap, np.zeros((7, 4, 6)), factor=2, **MODEL)
    unsorted = _synthetic_sources()
    unsorted[1], unsorted[2] = unsorted[2], unsorted[1]
    with pytest.raises(DerivedSeriesError, match="evenly spaced"):
        write_derived_series(unsorted, np.zeros((7, 4, 6)), factor=2, **MODEL)
    nan = np.zeros((7, 4, 6))
    nan[3, 1, 1] = np.nan
    with pytest.raises(DerivedSeriesError, match="NaN"):
        write_derived_series(sources, nan, factor=2, **MODEL)
