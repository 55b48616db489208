"""The receiver against real peers: a ``dicom-node serve`` subprocess, dcmtk storescu/echoscu.

Where dcmtk cannot produce the input (corrupt data, blank UIDs: storescu refuses to send those),
pynetdicom sends the file's bytes as they are (``STORE_SEND_CHUNKED_DATASET``).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config

from dicom_node.node import STATUS_FILE
from tests.support.node import (
    ECHOSCU,
    NodeProcess,
    dcmtk_env,
    echo,
    make_instances,
    parse_storescu_output,
    send_with_storescu,
    start_storescu,
)

QUIET = {"completion": {"quiet_seconds": 100000}}  # keep the pipeline away from these series


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with NodeProcess(
        tmp_path_factory.mktemp("node"),
        allowed_callers=[
            ("STORESCU", "127.0.0.1"),
            ("ECHOSCU", "127.0.0.1"),
            ("PYNETDICOM", "127.0.0.1"),
            ("REMOTE", "10.0.0.0/8"),  # right AE title, wrong network
        ],
        overrides=QUIET,
    ) as n:
        yield n


@contextlib.contextmanager
def raw_sender(port: int):
    """A pynetdicom association that sends files' bytes as they are (no decoding)."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="PYNETDICOM")
    for ts in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1"):  # one context each
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="ACVTT")
    try:
        assert assoc.is_established
        yield assoc
    finally:
        assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = old


def _status(rsp) -> int:
    return int(rsp.Status)


def _spool_files(node: NodeProcess) -> list[Path]:
    return [p for p in node.spool.rglob("*.dcm")]


def _spool_entries(node: NodeProcess) -> set[Path]:
    """Everything under the spool except the node's own status file, which it rewrites (through a
    temporary file) every few seconds."""
    status = Path(STATUS_FILE).stem
    return {p for p in node.spool.rglob("*") if not p.name.startswith(status)}


# -- the real series ---------------------------------------------------------------------------


def test_real_series_stored_and_indexed(node, sample_data):
    files = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))
    assert len(files) == 20
    result = send_with_storescu(files, node.port)
    assert result.returncode == 0, result.output[-2000:]
    assert set(result.statuses) == set(files)
    assert result.acknowledged == set(files)

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    rows = node.sqlite(
        "select i.sop_instance_uid, i.image_position, i.image_orientation, i.pixel_spacing,"
        " i.slice_thickness, i.rows, i.columns, i.frame_of_reference_uid, i.instance_number,"
        " i.acquisition_number, i.image_type, i.transfer_syntax_uid, i.file_path, i.file_size,"
        " i.calling_ae, i.sop_class_uid, s.state, s.revision, s.modality"
        " from instances i join series s on s.id = i.series_id where s.series_uid = ?",
        first.SeriesInstanceUID,
    )
    assert len(rows) == 20
    import json

    by_uid = {r[0]: r for r in rows}
    for f in files:
        ds = pydicom.dcmread(f)
        r = by_uid[ds.SOPInstanceUID]
        assert json.loads(r[1]) == [float(v) for v in ds.ImagePositionPatient]
        assert json.loads(r[2]) == [float(v) for v in ds.ImageOrientationPatient]
        assert json.loads(r[3]) == pytest.approx([0.9765625, 0.9765625])
        assert r[4] == 3.0
        assert (r[5], r[6]) == (512, 512)
        assert r[7] == ds.FrameOfReferenceUID
        assert r[8] == ds.InstanceNumber
        assert r[9] == ds.AcquisitionNumber
        assert json.loads(r[10]) == list(ds.ImageType)
        assert r[11] == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless, kept as it came
        assert r[14] == "STORESCU"
        assert r[15] == "1.2.840.10008.5.1.4.1.1.2"
        assert (r[16], r[17], r[18]) == ("receiving", 20, "CT")
        # The file is where the UIDs say, complete, and holds the pixel data untouched.
        path = node.spool / r[12]
        assert path == node.spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / (
            ds.SOPInstanceUID + ".dcm"
        )
        assert path.stat().st_size == r[13]
        stored = pydicom.dcmread(path)
        assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
        assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert stored.PixelData == ds.PixelData
    assert not list((node.spool / ".incoming").iterdir())
    # Slice positions: 20 slices 2 mm apart along z.
    zs = sorted(json.loads(r[1])[2] for r in rows)
    assert [round(b - a, 3) for a, b in zip(zs, zs[1:], strict=False)] == [2.0] * 19


# -- access control ----------------------------------------------------------------------------


def _echo_output(port: int, calling: str, called: str) -> tuple[int, str]:
    proc = subprocess.run(
        [ECHOSCU, "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=30,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_caller_not_allowed_is_rejected_permanently(node):
    rc, out = _echo_output(node.port, "INTRUDER", "ACVTT")
    assert rc != 0
    assert "Rejected Permanent" in out and "Calling AE Title Not Recognized" in out, out
    # Right AE title from the wrong network: same answer.
    rc, out = _echo_output(node.port, "REMOTE", "ACVTT")
    assert rc != 0 and "Calling AE Title Not Recognized" in out, out
    kinds = node.sqlite(
        "select count(*) from audit_events where kind = 'association_rejected'"
        " and calling_ae in ('INTRUDER', 'REMOTE')"
    )
    assert kinds[0][0] == 2


def test_wrong_called_ae_is_rejected(node):
    rc, out = _echo_output(node.port, "ECHOSCU", "NOTUS")
    assert rc != 0
    assert "Rejected Permanent" in out and "Called AE Title Not Recognized" in out, out
    assert echo(node.port, "ACVTT").returncode == 0  # and the node keeps serving


def test_other_sop_classes_refused_at_negotiation(node):
    ae = AE(ae_title="PYNETDICOM")
    mr = "1.2.840.10008.5.1.4.1.1.4"
    ae.add_requested_context(mr)
    for cls in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",
                "1.2.840.10008.5.1.4.1.1.2.2"):  # fmt: skip
        # RLE, JPEG lossless, HTJ2K, deflated: compressed syntaxes are accepted too.
        for ts in ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.201",
                   "1.2.840.10008.1.2.1.99"):  # fmt: skip
            ae.add_requested_context(cls, ts)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ACVTT")
    try:
        assert assoc.is_established
        accepted_ts = {
            (cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
        }
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert mr in rejected and mr not in accepted
    assert len(accepted_ts) == 12  # 3 CT classes x 4 transfer syntaxes
    assert {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",
            "1.2.840.10008.5.1.4.1.1.2.2"} <= accepted  # fmt: skip


# -- duplicates --------------------------------------------------------------------------------


def test_resent_and_changed_duplicates(node, sample_data, tmp_path):
    files = make_instances(
        sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[:3], 3, tmp_path / "a", seed="dup"
    )
    assert send_with_storescu(files, node.port).acknowledged == set(files)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID

    def series_row():
        return node.sqlite(
            "select s.revision, s.state, count(i.id) from series s join instances i"
            " on i.series_id = s.id where s.series_uid = ? group by s.id",
            series_uid,
        )[0]

    assert series_row() == (3, "receiving", 3)

    # Identical resend: acknowledged, nothing changes but an audit row.
    again = send_with_storescu(files[:1], node.port)
    assert again.acknowledged == {files[0]}
    assert series_row() == (3, "receiving", 3)
    sop = pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    assert node.sqlite(
        "select count(*) from audit_events where kind = 'duplicate' and sop_instance_uid = ?", sop
    )[0][0] == 1  # fmt: skip

    # The series was complete; then a changed instance (same SOP UID) arrives.
    import sqlite3

    con = sqlite3.connect(node.db_path, timeout=30)
    con.execute("update series set state = 'complete' where series_uid = ?", (series_uid,))
    con.commit()
    con.close()
    ds = pydicom.dcmread(files[0])
    ds.WindowCenter = 123
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    assert send_with_storescu([changed], node.port).acknowledged == {changed}
    assert series_row() == (4, "changed", 3)
    assert node.sqlite(
        "select count(*) from audit_events where kind = 'replaced' and sop_instance_uid = ?", sop
    )[0][0] == 1  # fmt: skip
    path = (
        node.spool
        / node.sqlite("select file_path from instances where sop_instance_uid = ?", sop)[0][0]
    )
    assert pydicom.dcmread(path, stop_before_pixels=True).WindowCenter == 123


# -- bad input ---------------------------------------------------------------------------------


def _instance_rows(node, sop: str) -> int:
    return node.sqlite("select count(*) from instances where sop_instance_uid = ?", sop)[0][0]


def test_corrupt_dataset_gets_cannot_understand(node, tmp_path):
    sop = generate_uid()
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds = pydicom.Dataset()
    ds.file_meta = meta
    path = tmp_path / "corrupt.dcm"
    ds.save_as(path, enforce_file_format=True)
    # SOPInstanceUID, then an element claiming 0xFFF0 bytes of value that aren't there.
    with open(path, "ab") as f:
        f.write(b"\x08\x00\x18\x00UI" + len(sop).to_bytes(2, "little") + sop.encode())
        f.write(b"\x10\x00\x10\x00PN\xf0\xff" + b"garbage" * 3)
    with raw_sender(node.port) as assoc:
        rsp = assoc.send_c_store(path)
    assert _status(rsp) == 0xC210
    assert "cannot decode" in rsp.get("ErrorComment", "")
    assert _instance_rows(node, sop) == 0
    assert node.sqlite(
        "select status from audit_events where kind = 'instance_rejected'"
        " and sop_instance_uid = ?", sop
    ) == [(0xC210,)]  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("StudyInstanceUID", "../../../../etc/x"),
        ("SeriesInstanceUID", "1.2." + "3" * 70),  # too long
        ("StudyInstanceUID", "1.2.03.4"),  # leading zero
    ],
)
def test_bad_uid_refused_and_never_a_path(node, sample_data, tmp_path, field, value):
    src = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    sop = generate_uid()
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    setattr(ds, field, value)
    path = tmp_path / "bad.dcm"
    ds.save_as(path)
    before = _spool_entries(node)
    with raw_sender(node.port) as assoc:
        rsp = assoc.send_c_store(path)
    assert _status(rsp) == 0xC212
    assert field in rsp.get("ErrorComment", "")
    assert _instance_rows(node, sop) == 0
    assert _spool_entries(node) == before
    assert not list(node.spool.parent.glob("**/x"))


def test_dataset_not_matching_the_command_gets_a900(node, sample_data, tmp_path):
    ds = pydicom.dcmread(sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[0])
    sop = generate_uid()
    ds.SOPInstanceUID = generate_uid()  # the data set says one thing...
    ds.file_meta.MediaStorageSOPInstanceUID = sop  # ...the C-STORE command another
    path = tmp_path / "mismatch.dcm"
    ds.save_as(path)
    with raw_sender(node.port) as assoc:
        rsp = assoc.send_c_store(path)
    assert _status(rsp) == 0xA900
    assert _instance_rows(node, sop) == 0 and _instance_rows(node, ds.SOPInstanceUID) == 0


def test_unrepaired_raw_files_refused_nothing_stored(node, sample_data):
    files = sorted(p for p in sample_data.ct_dicom_raw.iterdir() if p.is_file())
    assert len(files) == 20
    before = _spool_entries(node)
    count_before = node.sqlite("select count(*), max(id) from instances")
    with raw_sender(node.port) as assoc:
        statuses = []
        for f in files:
            rsp = assoc.send_c_store(f)
            statuses.append((_status(rsp), rsp.get("ErrorComment", "")))
    assert {s for s, _ in statuses} == {0xC211}
    assert all("SOPInstanceUID" in c and "StudyInstanceUID" in c for _, c in statuses)
    assert _spool_entries(node) == before
    # (The repaired copy of these files, same SOP UIDs, may be indexed by another test.)
    assert node.sqlite("select count(*), max(id) from instances") == count_before
    assert node.sqlite("select count(*) from instances where sop_instance_uid = ''") == [(0,)]
    assert node.sqlite("select count(*) from series where series_uid = ''") == [(0,)]


# -- back-pressure -----------------------------------------------------------------------------


def test_disk_minimum_above_free_space_rejects_transiently(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    n = NodeProcess(tmp_path / "n", overrides={"storage": {"min_free_bytes": free * 1000}, **QUIET})
    n.start(expect_rejection=True)
    with n:
        rc, out = _echo_output(n.port, "ECHOSCU", "ACVTT")
        assert rc != 0
        assert "Rejected Transient" in out and "Temporary congestion" in out.replace(
            "Congestion", "congestion"
        ), out
        rejected = n.sqlite(
            "select count(*) from audit_events where kind = 'association_rejected'"
            " and detail like '%free disk%'"
        )
        assert rejected[0][0] >= 2  # the start-up probe and ours


# -- concurrency -------------------------------------------------------------------------------


def test_eight_concurrent_associations(node, sample_data, tmp_path):
    sources = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))
    sets = [make_instances(sources, 15, tmp_path / f"s{i}", seed=f"conc-{i}") for i in range(8)]
    procs = [
        start_storescu(files, node.port, tmp_path / f"log{i}.txt") for i, files in enumerate(sets)
    ]
    for p in procs:
        assert p.wait(120) == 0
    for i, files in enumerate(sets):
        statuses = parse_storescu_output((tmp_path / f"log{i}.txt").read_text())
        assert statuses == {f: 0 for f in files}
        series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        assert node.sqlite(
            "select count(*) from instances i join series s on s.id = i.series_id"
            " where s.series_uid = ?", series_uid
        ) == [(15,)]  # fmt: skip


# -- crash safety ------------------------------------------------------------------------------


def test_kill_9_mid_send_then_restart_keeps_every_acknowledged_instance(sample_data, tmp_path):
    sources = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))
    files = make_instances(sources, 300, tmp_path / "in", seed=f"kill-{time.time()}")
    node = NodeProcess(tmp_path / "node", overrides=QUIET)
    node.start()
    try:
        log = tmp_path / "storescu.txt"
        sender = start_storescu(files, node.port, log)
        deadline = time.monotonic() + 60
        while node.sqlite("select count(*) from instances")[0][0] < 60:
            assert time.monotonic() < deadline, node.log_tail()
            assert sender.poll() is None, "storescu finished before the kill"
            time.sleep(0.02)
        node.kill()
        sender.wait(60)
        acked = {f for f, s in parse_storescu_output(log.read_text()).items() if s == 0}
        # An instance is indexed before its 0x0000 goes out, so the kill can catch the last
        # indexed ones unacknowledged: fewer than 60 acks is fine, none or all is not mid-send.
        assert 0 < len(acked) < 300

        node.start()
        by_sop = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
        indexed = dict(node.sqlite("select sop_instance_uid, file_path from instances"))
        for f in acked:
            sop = next(k for k, v in by_sop.items() if v == f)
            assert sop in indexed, f"acknowledged {f.name} is not in the index"
            stored = pydicom.dcmread(node.spool / indexed[sop])
            assert stored.SOPInstanceUID == sop
            assert stored.PixelData == pydicom.dcmread(f).PixelData
        assert not list((node.spool / ".incoming").glob("*.part"))  # cleaned at start-up

        # The sender retries everything; the node ends with exactly the 300.
        assert send_with_storescu(files, node.port).acknowledged == set(files)
        assert node.sqlite("select count(*) from instances") == [(300,)]
    finally:
        node.kill()


def _limit_file_size(limit: int):
    def apply() -> None:  # in the node's process: every file it writes stops at `limit` bytes
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_failed_spool_write_gets_a700_and_loses_nothing(sample_data, tmp_path):
    """A real write error from the OS (the file-size limit: EFBIG, as ENOSPC would be) on one
    instance: it is answered 0xA700 with the reason, nothing of it is indexed or left behind, and
    instances before and after it are stored as usual."""
    import numpy as np

    small = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))
    files = make_instances(small, 3, tmp_path / "in", seed=f"efbig-{time.time()}")
    big = pydicom.dcmread(files[0])
    big.decompress()
    big.SOPInstanceUID = generate_uid()
    big.Rows = big.Columns = 2048  # 8 MiB of pixels: above the limit below
    big.PixelData = np.zeros((2048, 2048), np.int16).tobytes()
    big.file_meta.MediaStorageSOPInstanceUID = big.SOPInstanceUID
    big_path = tmp_path / "big.dcm"
    big.save_as(big_path, enforce_file_format=True)

    with NodeProcess(
        tmp_path / "node", overrides=QUIET, preexec_fn=_limit_file_size(6 * 2**20)
    ) as node:
        result = send_with_storescu(
            [files[0], big_path, *files[1:]], node.port, extra_args=["--no-halt"]
        )
        assert result.statuses[files[0]] == 0 and result.statuses[files[2]] == 0
        assert result.statuses[big_path] == 0xA700, result.output[-2000:]
        indexed = {uid for (uid,) in node.sqlite("select sop_instance_uid from instances")}
        assert big.SOPInstanceUID not in indexed and len(indexed) == 3
        assert not list((node.spool / ".incoming").glob("*.part"))  # the partial file is gone
        failed = node.sqlite(
            "select detail from audit_events where kind = 'store_failed' and sop_instance_uid = ?",
            big.SOPInstanceUID,
        )
        assert failed and "too large" in failed[0][0].lower(), failed
        assert echo(node.port, node.AE_TITLE).returncode == 0  # still serving


def test_index_failure_gets_a700_leaves_no_orphan_and_a_resend_succeeds(sample_data, tmp_path):
    """The index database cannot be written (another process holds it locked past the busy
    timeout): 0xA700 with the reason, the new file is not left in the spool unindexed, and the
    sender's resend once the lock is gone is stored and indexed."""
    import sqlite3

    files = make_instances(
        sorted(sample_data.ct_dicom_repaired.glob("*.dcm")), 2, tmp_path / "in", seed="locked"
    )
    overrides = {**QUIET, "database": {"busy_timeout_ms": 50}}
    with NodeProcess(tmp_path / "node", overrides=overrides) as node:
        assert send_with_storescu(files[:1], node.port).acknowledged == {files[0]}
        locker = sqlite3.connect(node.db_path, timeout=5, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            locked = send_with_storescu(files[1:], node.port)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert locked.statuses[files[1]] == 0xA700, locked.output[-2000:]
        assert "index write failed" in locked.output
        assert len(_spool_files(node)) == 1  # only the first, indexed instance
        assert node.sqlite("select count(*) from instances") == [(1,)]

        assert send_with_storescu(files[1:], node.port).acknowledged == {files[1]}
        assert node.sqlite("select count(*) from instances") == [(2,)]
        assert len(_spool_files(node)) == 2


def test_changed_instance_with_index_failure_keeps_the_old_file(sample_data, tmp_path):
    """A changed instance (same SOP Instance UID) arrives while the index cannot be written: the
    stored file stays the one the index describes; the resend then replaces it properly."""
    import hashlib
    import sqlite3

    (original,) = make_instances(
        sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[:1], 1, tmp_path / "in", "replace"
    )
    changed_ds = pydicom.dcmread(original)
    changed_ds.SeriesDescription = "changed after the first send"
    changed = tmp_path / "changed.dcm"
    changed_ds.save_as(changed)
    overrides = {**QUIET, "database": {"busy_timeout_ms": 50}}
    with NodeProcess(tmp_path / "node", overrides=overrides) as node:
        assert send_with_storescu([original], node.port).acknowledged == {original}
        (stored,) = _spool_files(node)
        before = stored.read_bytes()
        (indexed_sha,) = node.sqlite("select sha256 from instances")[0]

        locker = sqlite3.connect(node.db_path, timeout=5, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            locked = send_with_storescu([changed], node.port)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert locked.statuses[changed] == 0xA700, locked.output[-2000:]
        assert stored.read_bytes() == before  # restored: the file the index describes
        assert node.sqlite("select sha256 from instances") == [(indexed_sha,)]
        assert _spool_files(node) == [stored] and not list(stored.parent.glob("*.prev"))

        assert send_with_storescu([changed], node.port).acknowledged == {changed}
        assert pydicom.dcmread(stored).SeriesDescription == "changed after the first send"
        (new_sha,) = node.sqlite("select sha256 from instances")[0]
        assert new_sha != indexed_sha
        assert hashlib.sha256(stored.read_bytes()).hexdigest() != hashlib.sha256(before).hexdigest()
