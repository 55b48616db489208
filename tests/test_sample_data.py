"""The fetched sample data: checksums pinned, and the repaired DICOM copy really repaired."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pydicom
import pytest

from dicom_node.devtools.sample_data import (
    SHA256,
    TrainingData,
    _extract_members,
    _sha256,
    fetch_training_data,
    repair_blanked_uids,
)
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


# --- the volumes behind `python -m dicom_node.devtools.sample_data --training` (issue 15) ---


@pytest.fixture(scope="module")
def training_data() -> TrainingData:
    """Fetched once (112 MB of sdists on a fresh machine, then cached under var/sample-data)."""
    return fetch_training_data()


def test_training_archives_and_members_match_pinned_checksums(training_data):
    archives = training_data.head_neck_ct.parent.parent / "archives"
    for name in ("dicom2stl-0.5.0.tar.gz", "pydosert-1.5.0.tar.gz"):
        assert _sha256(archives / name) == SHA256[name], name
    for path in (training_data.head_neck_ct, training_data.head_top_ct):
        assert _sha256(path) == SHA256[path.name], path.name


def test_pelvis_volume_is_the_npz_in_hu_with_its_spacing(training_data, tmp_path):
    import numpy as np
    import SimpleITK as sitk

    img = sitk.ReadImage(str(training_data.pelvis_rt_ct))
    assert img.GetSize() == (256, 256, 88)
    assert img.GetSpacing() == pytest.approx((1.5625, 1.5625, 4.5))
    hu = sitk.GetArrayFromImage(img)
    archive = training_data.head_neck_ct.parent.parent / "archives" / "pydosert-1.5.0.tar.gz"
    npz = tmp_path / "dlmodel_sample.npz"
    _extract_members(archive, {"pydosert-1.5.0/examples/data/dlmodel_sample.npz": npz})
    with np.load(npz) as z:
        src = z["input_array"][0]
    np.testing.assert_allclose(hu, src * 1000.0, rtol=1e-6, atol=1e-3)
    # pydosert clipped to +-1000 HU; air outside the body sits at the lower clip
    assert hu.min() == pytest.approx(-1000.0) and hu.max() <= 1000.0 + 1e-3
    # z runs from the thighs (smaller body cross-section) up to the iliac crest (larger); the
    # top slices of the npz are empty (air only), so compare the ends of the non-empty range
    body = (hu > -500).sum(axis=(1, 2))
    body = body[body > 0]
    assert body[-10:].mean() > 1.1 * body[:10].mean()


def test_alderson_series_is_the_160_slice_ct(training_data):
    from acvtt_core.volume_io import read_volume

    files = sorted(training_data.alderson_ct.iterdir())
    assert len(files) == 160
    assert {pydicom.dcmread(f, stop_before_pixels=True).Modality for f in files} == {"CT"}
    vol, geom = read_volume(training_data.alderson_ct)
    assert vol.shape == (160, 512, 512)
    assert geom.spacing == pytest.approx((0.7421875, 0.7421875, 2.0))
    assert vol.min() >= -1100 and vol.max() <= 3100


def test_head_volumes_have_the_expected_grids(training_data):
    import SimpleITK as sitk

    neck = sitk.ReadImage(str(training_data.head_neck_ct))
    top = sitk.ReadImage(str(training_data.head_top_ct))
    assert neck.GetSize() == (190, 240, 95)
    assert neck.GetSpacing() == pytest.approx((1.01, 1.01, 2.5))
    assert top.GetSize() == (256, 256, 26)
    assert top.GetSpacing() == pytest.approx((1.25, 1.25, 4.0))


def test_corrupted_cached_volume_is_extracted_again(training_data, tmp_path):
    """A cached volume that fails its pinned hash is replaced from the cached archive (no
    download: the archive is copied into the fresh cache first)."""
    real = training_data.head_neck_ct.parent.parent
    (tmp_path / "archives").mkdir()
    shutil.copyfile(
        real / "archives" / "dicom2stl-0.5.0.tar.gz",
        tmp_path / "archives" / "dicom2stl-0.5.0.tar.gz",
    )
    # the pydosert outputs already in place, so that this test does not extract 100 MB again
    (tmp_path / "volumes").mkdir()
    (tmp_path / "dicom").mkdir()
    shutil.copyfile(training_data.pelvis_rt_ct, tmp_path / "volumes" / "pelvis_rt_ct.nii.gz")
    (tmp_path / "dicom" / "alderson_ct").symlink_to(training_data.alderson_ct)
    first = fetch_training_data(tmp_path)
    assert _sha256(first.head_neck_ct) == SHA256["head_neck_ct.nii.gz"]
    first.head_neck_ct.write_bytes(b"not a volume")
    again = fetch_training_data(tmp_path)
    assert again.head_neck_ct == first.head_neck_ct
    assert _sha256(again.head_neck_ct) == SHA256["head_neck_ct.nii.gz"]


def test_training_flag_adds_the_new_volumes_to_the_cli_output(training_data):
    env = {**os.environ, "ACVTT_NODE_DATA": str(training_data.head_neck_ct.parent.parent)}
    # dicom_node.sample_data: the command as the docs long gave it, kept working
    for module in ("dicom_node.devtools.sample_data", "dicom_node.sample_data"):
        cmd = [sys.executable, "-m", module]
        plain = json.loads(subprocess.run(cmd, env=env, capture_output=True, check=True).stdout)
        full = json.loads(
            subprocess.run(cmd + ["--training"], env=env, capture_output=True, check=True).stdout
        )
        new = set(TrainingData.__dataclass_fields__)
        assert not new & set(plain)
        assert new <= set(full)
        assert full["pelvis_rt_ct"] == str(training_data.pelvis_rt_ct)
