"""A SOP Instance UID reused in another series (issue 10, defect 4), against a real node.

dcmtk's storescu sends five real CT slices as series A, then series B whose third instance
reuses A's third SOP Instance UID. The node refuses B's copy with 0xC213 and its reason, keeps A
whole (five indexed instances, files untouched), records an audit event on both series, and
``series show`` of A says what happened.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_node import db
from dicom_node.complete import plan_series
from dicom_node.header import STATUS_UID_CONFLICT, read_header
from dicom_node.index import Indexer, UidConflict
from dicom_node.plan import Rejection, SeriesPlan
from tests.support.node import NodeProcess, make_instances, send_with_storescu

QUIET = {"completion": {"quiet_seconds": 100000}}  # keep the pipeline away from these series


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def node(tmp_path):
    with NodeProcess(tmp_path / "node", overrides=QUIET) as n:
        yield n


def test_uid_reused_in_another_series_is_refused_and_the_first_series_stays_whole(
    node, sample_data, tmp_path
):
    sources = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[:5]
    a_files = make_instances(sources, 5, tmp_path / "a", seed="uid-conflict-A")
    b_files = make_instances(sources, 5, tmp_path / "b", seed="uid-conflict-B")
    a_third = pydicom.dcmread(a_files[2])
    reused = str(a_third.SOPInstanceUID)
    b_ds = pydicom.dcmread(b_files[2])
    b_ds.SOPInstanceUID = reused
    b_ds.file_meta.MediaStorageSOPInstanceUID = reused
    b_ds.save_as(b_files[2], enforce_file_format=True)
    series_a = str(a_third.SeriesInstanceUID)
    series_b = str(b_ds.SeriesInstanceUID)
    assert series_a != series_b

    sent_a = send_with_storescu(a_files, node.port)
    assert sent_a.acknowledged == set(a_files), sent_a.output[-2000:]
    indexed = dict(
        node.sqlite(
            "select i.sop_instance_uid, i.file_path from instances i"
            " join series s on s.id = i.series_id where s.series_uid = ?",
            series_a,
        )
    )
    before = {sop: _sha(node.spool / path) for sop, path in indexed.items()}

    sent_b = send_with_storescu(b_files, node.port, extra_args=["--no-halt"])
    # B's copy is refused with the chosen status and its reason; B's other slices are stored.
    assert sent_b.statuses[b_files[2]] == STATUS_UID_CONFLICT, sent_b.output[-3000:]
    assert "already in another series" in sent_b.output
    assert sent_b.acknowledged == set(b_files) - {b_files[2]}

    # A is whole: five rows, each file on disk with the bytes it had.
    rows = node.sqlite(
        "select i.sop_instance_uid, i.file_path from instances i"
        " join series s on s.id = i.series_id where s.series_uid = ?",
        series_a,
    )
    assert len(rows) == 5
    assert {sop: _sha(node.spool / path) for sop, path in rows} == before
    # B holds the other four, and none of B's copy is left in the spool.
    assert node.sqlite(
        "select count(*) from instances i join series s on s.id = i.series_id"
        " where s.series_uid = ?",
        series_b,
    ) == [(4,)]
    assert not list(node.spool.rglob(f"{series_b}/{reused}.dcm"))
    assert not list((node.spool / ".incoming").iterdir())

    # An audit event on both series, naming the other.
    events = {
        series: (kind, status, json.loads(detail))
        for kind, series, status, detail in node.sqlite(
            "select kind, series_uid, status, detail from audit_events"
            " where sop_instance_uid = ? and kind like 'uid_conflict%'",
            reused,
        )
    }
    assert set(events) == {series_a, series_b}
    assert events[series_b][:2] == ("uid_conflict_refused", STATUS_UID_CONFLICT)
    assert events[series_b][2]["other_series_uid"] == series_a
    assert events[series_b][2]["instance_number"] == 3
    assert events[series_a][:2] == ("uid_conflict_kept", STATUS_UID_CONFLICT)
    assert events[series_a][2]["other_series_uid"] == series_b

    # An administrator looking at A sees it.
    shown = node.cli("series", "show", series_a)
    assert shown.returncode == 0, shown.stderr
    assert "uid_conflict_kept" in shown.stdout
    shown = node.cli("series", "show", series_a, "--json")
    audit = json.loads(shown.stdout)["audit"]
    assert any(e["kind"] == "uid_conflict_kept" and series_b in e["detail"] for e in audit)

    # The identical resend of A's own instance into A stays the ordinary duplicate.
    again = send_with_storescu([a_files[2]], node.port)
    assert again.acknowledged == {a_files[2]}
    assert node.sqlite(
        "select count(*) from audit_events where kind = 'duplicate' and sop_instance_uid = ?",
        reused,
    ) == [(1,)]


# -- completion of the series whose copy was refused ---------------------------------------------


@pytest.fixture
def indexer(tmp_path):
    url = f"sqlite:///{tmp_path / 'node.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    sessions = db.make_session_factory(engine)
    yield Indexer(sessions), sessions
    engine.dispose()


def _record(idx: Indexer, path: Path) -> str:
    data = path.read_bytes()
    h = read_header(data)
    return idx.record(h, f"{h.series_uid}/{h.sop_instance_uid}.dcm", len(data), _sha(path), "T")


def _plan(sessions, series_uid: str):
    with sessions() as s:
        series = s.scalars(select(db.Series).where(db.Series.series_uid == series_uid)).one()
        return plan_series(series, "/nonexistent")


def test_series_with_a_refused_slice_is_rejected_until_the_slice_comes(
    indexer, sample_data, tmp_path
):
    """B lost its third slice to the conflict: B is rejected as a whole, naming the slice, not
    planned from four slices with a gap; A plans as it was. When the sender sends B's third slice
    again under a UID of its own, B plans with all five."""
    idx, sessions = indexer
    sources = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[:5]
    a_files = make_instances(sources, 5, tmp_path / "a", seed="refused-A")
    b_files = make_instances(sources, 5, tmp_path / "b", seed="refused-B")
    reused = str(pydicom.dcmread(a_files[2], stop_before_pixels=True).SOPInstanceUID)
    b_ds = pydicom.dcmread(b_files[2])
    own_uid = str(b_ds.SOPInstanceUID)
    b_ds.SOPInstanceUID = reused
    b_ds.file_meta.MediaStorageSOPInstanceUID = reused
    conflicting = tmp_path / "conflicting.dcm"
    b_ds.save_as(conflicting, enforce_file_format=True)
    series_a = str(pydicom.dcmread(a_files[0], stop_before_pixels=True).SeriesInstanceUID)
    series_b = str(b_ds.SeriesInstanceUID)

    for f in a_files:
        assert _record(idx, f) == "new"
    for f in (b_files[0], b_files[1], b_files[3], b_files[4]):
        assert _record(idx, f) == "new"
    with pytest.raises(UidConflict) as caught:
        _record(idx, conflicting)
    assert caught.value.other_series_uid == series_a
    assert caught.value.other_instance_number == 3
    idx.record_uid_conflict(caught.value, "T")

    plan_a = _plan(sessions, series_a)
    assert isinstance(plan_a, SeriesPlan) and plan_a.n_slices == 5
    rejected = _plan(sessions, series_b)
    assert isinstance(rejected, Rejection)
    assert "whole series is rejected" in rejected.reason
    assert "instance #3 at (" in rejected.reason and "0xC213" in rejected.reason
    assert series_a in rejected.reason

    # The sender fixes its UIDs: B's third slice arrives under its own UID.
    assert _record(idx, b_files[2]) == "new"
    assert own_uid != reused
    plan_b = _plan(sessions, series_b)
    assert isinstance(plan_b, SeriesPlan) and plan_b.n_slices == 5
