"""The fetched sample data: checksums pinned, and the repaired DICOM copy really repaired."""

from __future__ import annotations

import pydicom

from dicom_node.sample_data import SHA256, _sha256, repair_blanked_uids
from dicom_node.uids import is_valid_uid


def test_archives_match_pinned_checksums(sample_data):
    archives = sample_data.ct_dicom_raw.parent.parent / "archives"
    for path in archives.iterdir():
        if path.name in SHA256:
            assert _sha256(path) == SHA256[path.name], path.name
    assert _sha256(sample_data.lung1) == SHA256["lung1_image.nrrd"]


def test_raw_series_has_blank_uids(sample_data):
    files = sorted(sample_data.ct_dicom_raw.iterdir())
    assert len(files) == 20
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert not ds.get("SOPInstanceUID")
    assert not ds.get("SeriesInstanceUID")


def test_repaired_series_has_valid_deterministic_uids(sample_data, tmp_path):
    files = sorted(sample_data.ct_dicom_repaired.iterdir())
    assert len(files) == 20
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for ds in headers:
        for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            assert is_valid_uid(str(ds[kw].value)), kw
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert len({ds.SeriesInstanceUID for ds in headers}) == 1
    assert len({ds.SOPInstanceUID for ds in headers}) == 20

    again = repair_blanked_uids(sample_data.ct_dicom_raw, tmp_path / "again")
    first = pydicom.dcmread(sorted(again.iterdir())[0], stop_before_pixels=True)
    assert first.SeriesInstanceUID == headers[0].SeriesInstanceUID
    assert first.StudyInstanceUID == headers[0].StudyInstanceUID


def test_repaired_pixels_are_unchanged(sample_data):
    raw = pydicom.dcmread(sorted(sample_data.ct_dicom_raw.iterdir())[0])
    fixed = pydicom.dcmread(
        sample_data.ct_dicom_repaired / f"{raw.file_meta.MediaStorageSOPInstanceUID}.dcm"
    )
    assert fixed.file_meta.TransferSyntaxUID == raw.file_meta.TransferSyntaxUID
    assert fixed.PixelData == raw.PixelData
    assert (fixed.pixel_array == raw.pixel_array).all()
