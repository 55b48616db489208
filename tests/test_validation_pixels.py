"""Pixel data problems (issue 10, defect 7): what the receiver refuses at once, and what the job
rejects later with a reason a person can read.

Real CT files rewritten with one fault each, sent with dcmtk's storescu to a real node:

* cheap header checks at receive (Rows/Columns, BitsAllocated, PixelData present, non-empty and
  as long as Rows x Columns x samples x frames x BitsAllocated / 8 for native data): 0xA900 with
  the reason in the Error Comment, nothing stored, an audit event naming series and slice;
* compressed data whose fragments do not decode are acknowledged (judging them means decoding),
  and the job rejects the whole series, naming the slice by instance number and position;
* a slice refused at receive rejects its whole series at completion, naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from dicom_node.header import STATUS_DATASET_MISMATCH, PixelDataExtent, pixel_problem
from dicom_node.load import LoadError, load_series
from dicom_node.plan import plan_slices
from dicom_node.slices import slice_refs_from_file
from tests.support.node import PROCESS_CT_NOWHERE, NodeProcess, make_instances, send_with_storescu
from tests.support.polling import wait_until

QUIET = {"completion": {"quiet_seconds": 100000}}  # keep the pipeline away from these series


def _native(sample_data) -> list[Path]:
    """The real 5-slice CT (16x16, 16 bits, explicit VR little endian: 512 bytes of pixels)."""
    return sorted(p for p in sample_data.pydicom_ct5n.iterdir() if p.is_file())


def _rewrite(src: Path, out: Path, series_uid: str | None = None, **changes) -> Path:
    """``src`` with a new SOP Instance UID (and series), ``changes`` applied (None deletes)."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with NodeProcess(tmp_path_factory.mktemp("node"), overrides=QUIET) as n:
        yield n


# -- refused at receive ------------------------------------------------------------------------

CASES = [
    ({"Rows": 0}, "Rows is 0; must be positive"),
    ({"Columns": 0}, "Columns is 0; must be positive"),
    ({"BitsAllocated": 12}, "BitsAllocated 12 is not 1, 8, 16, 32 or 64"),
    ({"PixelData": b""}, "PixelData is empty"),
    ({"PixelData": b"\0" * 256}, "PixelData is 256 bytes; the image needs 512"),
    ({"PixelData": None}, "PixelData is absent"),
    ({"NumberOfFrames": 0}, "NumberOfFrames is 0; must be positive"),
]


@pytest.mark.parametrize(("changes", "reason"), CASES, ids=[r for _, r in CASES])
def test_refused_at_receive_with_the_reason(node, sample_data, tmp_path, changes, reason):
    src = _native(sample_data)
    series_uid = generate_uid()
    good = _rewrite(src[0], tmp_path / "good.dcm", series_uid)
    bad = _rewrite(src[2], tmp_path / "bad.dcm", series_uid, **changes)
    bad_ds = pydicom.dcmread(bad, stop_before_pixels=True)

    sent = send_with_storescu([good, bad], node.port, extra_args=["--no-halt"])
    assert sent.statuses == {good: 0, bad: STATUS_DATASET_MISMATCH}, sent.output[-3000:]
    assert f"LO [{reason}]" in sent.output and "ErrorComment" in sent.output, sent.output[-3000:]

    sop = str(bad_ds.SOPInstanceUID)
    assert node.sqlite("select count(*) from instances where sop_instance_uid = ?", sop) == [(0,)]
    assert not list(node.spool.rglob(f"{sop}.dcm"))
    (row,) = node.sqlite(
        "select series_uid, status, detail from audit_events"
        " where kind = 'instance_rejected' and sop_instance_uid = ?",
        sop,
    )
    assert row[:2] == (series_uid, STATUS_DATASET_MISMATCH)
    detail = json.loads(row[2])
    assert detail["reason"] == reason
    assert detail["instance_number"] == int(bad_ds.InstanceNumber)
    assert detail["position"] == pytest.approx([float(v) for v in bad_ds.ImagePositionPatient])


def test_sound_native_and_compressed_files_are_stored(node, sample_data, tmp_path):
    """The checks refuse nothing sound: the native series (a 1-byte padding allowed beyond
    the image is not needed here) and the real JPEG 2000 series."""
    native = [_rewrite(p, tmp_path / "n" / p.name, "1.2.826.0.1.3680043.8.498.7001") for p in
              _native(sample_data)]  # fmt: skip
    j2k = make_instances(
        sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[:3], 3, tmp_path / "j", seed="px-ok"
    )
    sent = send_with_storescu(native + j2k, node.port)
    assert sent.acknowledged == set(native + j2k), sent.output[-2000:]


# -- the pure check, hand-made cases -----------------------------------------------------------


def _ds(**values) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 4, 3, 16, 1
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def test_pixel_problem_by_hand():
    # 4 x 3 pixels x 16 bits = 24 bytes; 3 frames of RGB 8-bit = 4*3*3*3 = 108 bytes.
    assert pixel_problem(_ds(), PixelDataExtent(24, False)) is None
    assert pixel_problem(_ds(), PixelDataExtent(25, False)) is None  # padding is not a fault
    assert pixel_problem(_ds(), PixelDataExtent(23, False)) == (
        "PixelData is 23 bytes; the image needs 24"
    )
    rgb = _ds(BitsAllocated=8, SamplesPerPixel=3, NumberOfFrames=3)
    assert pixel_problem(rgb, PixelDataExtent(108, False)) is None
    assert pixel_problem(rgb, PixelDataExtent(107, False)).endswith("needs 108")
    # 1-bit: 12 pixels need 2 bytes
    assert pixel_problem(_ds(BitsAllocated=1), PixelDataExtent(2, False)) is None
    assert pixel_problem(_ds(BitsAllocated=1), PixelDataExtent(1, False)).endswith("needs 2")
    assert pixel_problem(_ds(), PixelDataExtent(0, True, fragments=1)) is None
    assert pixel_problem(_ds(), PixelDataExtent(0, True, fragments=0)) == (
        "PixelData (compressed) holds no fragment"
    )
    assert pixel_problem(_ds(), None) == "PixelData is absent"
    assert pixel_problem(_ds(), None, check_pixel_data=False) is None
    no_rows = _ds()
    del no_rows.Rows
    assert pixel_problem(no_rows, None) == "Rows is absent"
    assert all(len(reason) <= 64 for _, reason in CASES)  # they fit an Error Comment (LO)


# -- rejected at job time, and at completion ---------------------------------------------------


def _series_state(node: NodeProcess, uid: str):
    rows = node.sqlite("select state, state_reason from series where series_uid = ?", uid)
    return rows[0] if rows and rows[0][0] not in ("receiving", "changed", "complete") else None


def test_one_broken_slice_rejects_the_whole_series_naming_it(sample_data, tmp_path):
    """Two real series through a real node with its pipeline:

    * a JPEG 2000 series whose third slice holds a fragment that is no JPEG 2000 code stream:
      acknowledged (only decoding can tell), then the job rejects the whole series, naming the
      slice by instance number and position with the decoder's own words;
    * a native series whose third slice has Rows 0: refused at receive, and the series, missing
      that slice, is rejected at completion with the refusal named, not planned from the rest.
    """
    j2k = make_instances(
        sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[:5], 5, tmp_path / "j2k", seed="px-job"
    )
    broken = pydicom.dcmread(j2k[2])
    broken.PixelData = encapsulate([b"\x00" * 1000])
    broken.save_as(j2k[2], enforce_file_format=True)
    j2k_series = str(broken.SeriesInstanceUID)
    j2k_pos = [float(v) for v in broken.ImagePositionPatient]

    native_series = generate_uid()
    native = [
        _rewrite(
            p, tmp_path / "native" / f"{i}.dcm", native_series, **({"Rows": 0} if i == 2 else {})
        )
        for i, p in enumerate(_native(sample_data))
    ]
    refused = pydicom.dcmread(native[2], stop_before_pixels=True)

    with NodeProcess(tmp_path / "node", overrides=PROCESS_CT_NOWHERE) as node:
        sent = send_with_storescu(j2k, node.port)
        assert sent.acknowledged == set(j2k), sent.output[-2000:]
        sent = send_with_storescu(native, node.port, extra_args=["--no-halt"])
        assert sent.statuses[native[2]] == STATUS_DATASET_MISMATCH
        assert sent.acknowledged == set(native) - {native[2]}

        state, reason = wait_until(
            lambda: _series_state(node, native_series), 60, "the native series' verdict"
        )
        assert state == "rejected", (state, reason)
        assert reason.startswith("the whole series is rejected: ")
        assert f"instance #{int(refused.InstanceNumber)} at (" in reason
        assert "refused at receive (0xA900: Rows is 0; must be positive)" in reason

        state, reason = wait_until(
            lambda: _series_state(node, j2k_series), 300, "the JPEG 2000 series' job", interval=1
        )
        assert state == "rejected", (state, reason, node.log_tail())
        where = ", ".join(f"{v:.1f}" for v in j2k_pos)
        assert reason.startswith(
            f"the whole series is rejected: slice #{int(broken.InstanceNumber)} at ({where}) mm "
            "cannot be used: its JPEG 2000"
        ), reason
        assert "pixel data cannot be decoded (" in reason
        assert "NoneType" not in reason and broken.SOPInstanceUID not in reason
        (job,) = node.sqlite("select state, reason from jobs")
        assert job == ("rejected", reason)


def test_load_names_the_slice_for_files_that_got_in_unchecked(sample_data, tmp_path):
    """Files indexed before the receive checks existed (or in a syntax they do not walk): a
    zero-length PixelData gives a readable rejection, not "object of type 'NoneType' has no
    len()"; two broken files: the first is named, the other counted."""
    files = [_rewrite(p, tmp_path / f"{i}.dcm") for i, p in enumerate(_native(sample_data))]
    for i in (1, 3):
        _rewrite(files[i], files[i], PixelData=b"")
    plan = plan_slices("1.2.3", [r for f in files for r in slice_refs_from_file(f)])
    with pytest.raises(LoadError) as caught:
        load_series(plan, workers=2)
    reason = str(caught.value)
    first = next(s for s in plan.slices if s.file_path in {str(files[1]), str(files[3])})
    assert reason.startswith(f"the whole series is rejected: slice {first.label} at (")
    assert "cannot be used: PixelData is empty (and 1 more file(s) that cannot be used)" in reason
    assert "NoneType" not in reason

    # The intact files still load as before.
    good = plan_slices("1.2.3", [r for f in (files[0], files[2], files[4]) for r in
                                 slice_refs_from_file(f)])  # fmt: skip
    assert load_series(good).volume.shape == (3, 16, 16)
    assert np.isfinite(load_series(good).volume).all()
