"""C-STORE SCU against real peers: dcmtk storescp, Debian Orthanc, and a pynetdicom acceptor."""

from __future__ import annotations

import random
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset

from dicom_node.db import JobState
from dicom_node.deliver import AttemptResult, NextStep, RetryPolicy, decide
from dicom_node.send import (
    Destination,
    FailureKind,
    SendResult,
    associate,
    classify_status,
    next_retry_delay,
    send_instances,
)
from tests.support.dcmtk import free_port, storescp
from tests.support.derived import small_derived_series
from tests.support.orthanc import OrthancServer

CALLING = "ACVTT_NODE"


@pytest.fixture(scope="module")
def derived_files(sample_data, tmp_path_factory) -> list[Path]:
    """A small derived series (9 uncompressed instances) written from the real CT headers."""
    return small_derived_series(sample_data.ct_dicom_repaired, tmp_path_factory.mktemp("derived"))


def _uids(paths) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_success_to_storescp_with_nodelay(derived_files, tmp_path):
    with storescp(tmp_path, ae_title="STORESCP") as scp:
        dest = Destination(scp.ae_title, scp.host, scp.port)
        res = send_instances(dest, derived_files, calling_ae_title=CALLING)
        assert res.ok and res.failure is None
        assert res.nodelay is True
        assert [o.status for o in res.outcomes] == [0x0000] * len(derived_files)
        assert _uids(scp.received_files()) == _uids(derived_files)

        # Datasets work as well as paths; a resend of everything acknowledged sends nothing.
        again = send_instances(
            dest,
            [pydicom.dcmread(p) for p in derived_files],
            calling_ae_title=CALLING,
            already_acknowledged=res.acknowledged,
        )
        assert again.ok and again.sent_now == [] and again.nodelay is None


def _data_set_bytes(path: Path) -> bytes:
    """A file's bytes after its File Meta Information."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_files_go_as_they_are_when_their_syntax_is_accepted(derived_files, tmp_path):
    # dcmtk rewrites the files with group length elements (retired, but legal), which pydicom
    # drops when it re-encodes a data set: only a file sent as it is arrives with the same bytes.
    sent = []
    for i, f in enumerate(derived_files[:3]):
        out = tmp_path / f"group-lengths-{i}.dcm"
        subprocess.run(["/usr/bin/dcmconv", "+g", str(f), str(out)], check=True)
        sent.append(out)
    with storescp(tmp_path / "scp", extra_args=["+B"]) as scp:  # bit-preserving
        res = send_instances(Destination(scp.ae_title, scp.host, scp.port), sent,
                             calling_ae_title=CALLING)  # fmt: skip
        assert res.ok, res.failure
        received = {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in scp.received_files()
        }
    assert len(received) == len(sent)
    for f in sent:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert _data_set_bytes(received[uid]) == _data_set_bytes(f)
        assert _data_set_bytes(f) != _data_set_bytes(derived_files[sent.index(f)])  # dcmconv did


def test_peer_accepting_only_the_other_syntax_gets_a_converted_copy(derived_files, tmp_path):
    with storescp(tmp_path, extra_args=["+xi"]) as scp:  # implicit VR little endian only
        res = send_instances(Destination(scp.ae_title, scp.host, scp.port), derived_files,
                             calling_ae_title=CALLING)  # fmt: skip
        assert res.ok, res.failure
        received = [pydicom.dcmread(p) for p in scp.received_files()]
    assert len(received) == len(derived_files)
    assert {str(d.file_meta.TransferSyntaxUID) for d in received} == {ImplicitVRLittleEndian}
    originals = {str(d.SOPInstanceUID): d for d in map(pydicom.dcmread, derived_files)}
    for d in received:
        assert d.PixelData == originals[str(d.SOPInstanceUID)].PixelData


def test_associate_sets_tcp_nodelay_before_any_store(tmp_path):
    with storescp(tmp_path) as scp:
        assoc, info = associate(
            Destination(scp.ae_title, scp.host, scp.port),
            CALLING,
            [(CTImageStorage, [ExplicitVRLittleEndian])],
        )
        try:
            assert assoc.is_established
            sock = assoc.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert info.nodelay is True
        finally:
            assoc.release()


def test_closed_port_is_transient(derived_files):
    res = send_instances(
        Destination("NOBODY", "127.0.0.1", free_port()), derived_files, calling_ae_title=CALLING
    )
    assert res.failure is not None and res.failure.kind is FailureKind.TRANSIENT
    assert "cannot connect" in res.failure.reason
    assert res.retryable and res.pending == [o.sop_instance_uid for o in res.outcomes]


def test_storescp_refuse_is_permanent(derived_files, tmp_path):
    with storescp(tmp_path, extra_args=["--refuse"]) as scp:
        res = send_instances(
            Destination(scp.ae_title, scp.host, scp.port), derived_files, calling_ae_title=CALLING
        )
    assert res.failure is not None and res.failure.kind is FailureKind.PERMANENT
    assert "rejected (permanent)" in res.failure.reason


def test_rejection_left_unread_by_an_aborting_requestor_still_counts():
    """pynetdicom can abort on the closed socket before its ACSE reads the peer's A-ASSOCIATE-RJ
    (seen under CPU load with ``storescp --refuse``); the queued rejection must still decide."""
    from pynetdicom.association import Association
    from pynetdicom.pdu_primitives import A_ASSOCIATE

    from dicom_node.send import _association_failure, _AssocInfo

    assoc = Association(AE("NODE"), mode="requestor")
    assoc.is_aborted = True
    info = _AssocInfo(connected=True)
    dest = Destination("PACS", "127.0.0.1", 104)
    assert _association_failure(assoc, info, dest).kind is FailureKind.TRANSIENT

    rj = A_ASSOCIATE()
    rj.result, rj.result_source, rj.diagnostic = 0x01, 0x01, 0x01
    assoc.dul.to_user_queue.put(rj)
    failure = _association_failure(assoc, _AssocInfo(connected=True), dest)
    assert failure.kind is FailureKind.PERMANENT
    assert "rejected (permanent)" in failure.reason


def test_orthanc_rejects_unknown_calling_ae_permanently(derived_files, tmp_path):
    strict = {
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowMove": False,
    }
    with OrthancServer(
        tmp_path / "orthanc",
        aet="PACS",
        modalities={"NODE": (CALLING, "127.0.0.1", 104)},
        config_overrides=strict,
    ) as pacs:
        dest = Destination("PACS", pacs.host, pacs.dicom_port)
        res = send_instances(dest, derived_files, calling_ae_title="STRANGER")
        assert res.failure is not None and res.failure.kind is FailureKind.PERMANENT
        assert "Calling AE title not recognised" in res.failure.reason
        assert pacs.get("/instances") == []

        # Orthanc answers 0xA700 to an instance without StudyInstanceUID: permanent, stop at once.
        broken = pydicom.dcmread(derived_files[0])
        del broken.StudyInstanceUID
        res = send_instances(dest, [broken, *derived_files[1:]], calling_ae_title=CALLING)
        assert res.failure is not None and res.failure.kind is FailureKind.PERMANENT
        assert res.outcomes[0].status == 0xA700 and "0xA700" in res.failure.reason
        assert all(o.detail == "not sent" for o in res.outcomes[1:])

        res = send_instances(dest, derived_files, calling_ae_title=CALLING)
        assert res.ok and len(pacs.get("/instances")) == len(derived_files)


def test_transient_rejection_from_busy_peer(derived_files):
    """pynetdicom's acceptor rejects (transient, 'local limit exceeded') above its maximum."""
    ae = AE(ae_title="BUSY")
    ae.maximum_associations = 1
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        holder, _ = associate(
            Destination("BUSY", "127.0.0.1", port),
            "HOLDER",
            [(CTImageStorage, ["1.2.840.10008.1.2.1"])],
        )
        assert holder.is_established
        res = send_instances(
            Destination("BUSY", "127.0.0.1", port), derived_files, calling_ae_title=CALLING
        )
        holder.release()
    finally:
        server.shutdown()
    assert res.failure is not None and res.failure.kind is FailureKind.TRANSIENT
    assert "rejected (transient)" in res.failure.reason


def test_abort_is_transient(derived_files, tmp_path):
    with storescp(tmp_path, extra_args=["--abort-after"]) as scp:
        res = send_instances(
            Destination(scp.ae_title, scp.host, scp.port), derived_files, calling_ae_title=CALLING
        )
    assert res.failure is not None and res.failure.kind is FailureKind.TRANSIENT
    assert res.acknowledged == set()


def test_partial_ack_then_resend_only_the_rest(derived_files, tmp_path):
    """storescp dies after two instances; the resend goes to a fresh peer with only the rest."""
    with storescp(tmp_path / "a", extra_args=["--sleep-after", "1"]) as scp:

        def kill_after_two() -> None:
            deadline = time.monotonic() + 20
            while len(scp.received_files()) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            scp.process.kill()

        killer = threading.Thread(target=kill_after_two)
        killer.start()
        first = send_instances(
            Destination(scp.ae_title, scp.host, scp.port), derived_files, calling_ae_title=CALLING
        )
        killer.join()
        stored_first = _uids(scp.received_files())
    assert first.retryable, first.failure
    assert 1 <= len(first.acknowledged) < len(derived_files)
    assert first.acknowledged <= stored_first  # every acknowledged instance is really there

    with storescp(tmp_path / "b") as scp2:
        second = send_instances(
            Destination(scp2.ae_title, scp2.host, scp2.port),
            derived_files,
            calling_ae_title=CALLING,
            already_acknowledged=first.acknowledged,
        )
        resent = _uids(scp2.received_files())
    assert second.ok
    assert resent == set(first.pending)
    assert resent.isdisjoint(first.acknowledged)
    assert resent | first.acknowledged == _uids(derived_files)


def _send_until_decided(
    destination: Destination,
    files: list[Path],
    policy: RetryPolicy,
    sleep,
    rng: random.Random | None = None,
) -> tuple[SendResult, int, NextStep]:
    """Send, then resend what is still unacknowledged for as long as deliver.decide says to
    retry: the node's delivery loop for one destination, without its database (``sleep`` stands
    in for the scheduler's wait). Returns the last result, the attempts made and the decision."""
    acked: set[str] = set()
    failing_since: datetime | None = None
    attempts = 0
    while True:
        attempts += 1
        res = send_instances(
            destination, files, calling_ae_title=CALLING, already_acknowledged=acked
        )
        acked = res.acknowledged
        attempt = AttemptResult()
        if res.failure is not None:
            attempt.add_failure(res.failure.kind, res.failure.reason)
        now = datetime.now(UTC)
        step = decide(
            attempt,
            attempts_so_far=attempts,
            failing_since=failing_since,
            now=now,
            policy=policy,
            rng=rng,
        )
        if step.retry_in_s is None:
            return res, attempts, step
        failing_since = failing_since or now
        sleep(step.retry_in_s)


def test_retries_until_orthanc_comes_back(derived_files, tmp_path):
    pacs = OrthancServer(tmp_path / "orthanc", aet="PACS")
    delays: list[float] = []

    def sleep_then_restart(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 2:  # the PACS comes back after two failed attempts
            pacs.start()

    try:
        res, attempts, step = _send_until_decided(
            Destination("PACS", pacs.host, pacs.dicom_port),
            derived_files,
            RetryPolicy(base_delay_s=1.0, max_attempts=5),
            sleep_then_restart,
            rng=random.Random(1),
        )
        assert res.ok and attempts == 3 and step.state is JobState.sent
        assert len(pacs.get("/instances")) == len(derived_files)
        # Stop and start on the same storage: still exactly one copy after a full resend.
        pacs.stop()
        pacs.start()
        again = send_instances(
            Destination("PACS", pacs.host, pacs.dicom_port), derived_files, calling_ae_title=CALLING
        )
        assert again.ok and len(pacs.get("/series")) == 1
        assert len(pacs.get("/instances")) == len(derived_files)
    finally:
        pacs.stop()
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0


def test_retries_stop_at_limit_and_on_permanent(derived_files, tmp_path):
    delays: list[float] = []
    res, attempts, step = _send_until_decided(
        Destination("NOBODY", "127.0.0.1", free_port()),
        derived_files,
        RetryPolicy(max_attempts=3),
        delays.append,
    )
    assert attempts == 3 and res.retryable and len(delays) == 2
    assert step.state is JobState.failed and "after 3 attempts" in step.reason
    with storescp(tmp_path, extra_args=["--refuse"]) as scp:
        res, attempts, step = _send_until_decided(
            Destination(scp.ae_title, scp.host, scp.port),
            derived_files,
            RetryPolicy(max_attempts=5),
            delays.append,
        )
    assert attempts == 1 and res.failure.kind is FailureKind.PERMANENT and len(delays) == 2
    assert step.state is JobState.failed


def test_invalid_input_fails_permanently_without_connecting(sample_data):
    raw = sorted(Path(sample_data.ct_dicom_raw).glob("*"))[:2]  # blanked dataset UIDs
    res = send_instances(
        Destination("NOBODY", "127.0.0.1", free_port()), raw, calling_ae_title=CALLING
    )
    assert res.failure is not None and res.failure.kind is FailureKind.PERMANENT
    assert "valid SOP" in res.failure.reason


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (0x0000, None),
        (0xB000, None),
        (0xB007, None),
        (0x0001, None),
        (0xA700, FailureKind.PERMANENT),
        (0xA7FF, FailureKind.PERMANENT),
        (0xA900, FailureKind.PERMANENT),
        (0xC000, FailureKind.PERMANENT),
        (0xC210, FailureKind.PERMANENT),
        (0x0122, FailureKind.PERMANENT),
        (0x0110, FailureKind.PERMANENT),
    ],
)
def test_classify_status(status, kind):
    assert classify_status(status) is kind


def test_next_retry_delay_backoff_with_jitter():
    rng = random.Random(42)
    for attempt, (lo, hi) in enumerate([(1, 2), (2, 4), (4, 8), (8, 16), (10, 20), (10, 20)]):
        for _ in range(50):
            d = next_retry_delay(attempt, base=2.0, cap=20.0, rng=rng)
            assert lo <= d <= hi
    draws = {next_retry_delay(3, base=2.0, cap=20.0, rng=rng) for _ in range(20)}
    assert len(draws) == 20  # jitter: no two senders wait exactly the same
    assert next_retry_delay(10_000, base=1.0, cap=60.0, rng=rng) <= 60.0
    a = [next_retry_delay(i, rng=random.Random(7)) for i in range(4)]
    b = [next_retry_delay(i, rng=random.Random(7)) for i in range(4)]
    assert a == b  # deterministic for a seeded rng
    with pytest.raises(ValueError):
        next_retry_delay(-1)


def _their_request_p_data(path: Path, offset: int, msg_id: int, sop_uid: str, priority: int,
                          max_pdu: int) -> list:  # fmt: skip
    """The P-DATA values pynetdicom sends for ``path`` as it is: ``send_c_store`` with
    STORE_SEND_CHUNKED_DATASET builds this request and encodes it so."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = sop_uid
    req.Priority = priority
    req._dataset_path = (path, offset)
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    return [p.presentation_data_value_list for p in message.encode_msg(5, max_pdu)]


@pytest.mark.parametrize("max_pdu", [0, 16384, 4096, 60])
def test_requests_for_files_are_the_p_data_pynetdicom_sends(derived_files, tmp_path, max_pdu):
    """The node's own C-STORE request encoding (send._c_store_values with
    association_reactor.store_request_command_set) gives the same P-DATA as pynetdicom's for a
    file sent as it is: message ids up to 65535, each priority, odd and even UIDs of up to 64
    characters, a command set split over several values (a PDU of 60 bytes), an empty data set."""
    from dicom_node.association_reactor import store_request_command_set
    from dicom_node.send import _c_store_values

    path = derived_files[0]
    offset = split_dataset(path)[1]
    cases = [
        (1, "1.2.3.4", 2, offset),
        (2, "1.2.3.45", 0, offset),
        (65535, "1." + "9" * 62, 1, offset),
        (7, "1.2.3.4", 2, path.stat().st_size),  # nothing after the meta
    ]
    for msg_id, uid, priority, start in cases:
        command = store_request_command_set(CTImageStorage, uid, msg_id, priority)
        ours = [[(5, v)] for v in _c_store_values(command, path, start, max_pdu)]
        assert ours == _their_request_p_data(path, start, msg_id, uid, priority, max_pdu)
        if max_pdu:  # every value fits the PDU; at 60 bytes the command set is split
            assert all(len(pdvs[0][1]) + 6 <= max_pdu + 1 for pdvs in ours)
            assert (ours[0][0][1][0] == 0x01) == (max_pdu == 60)
    assert store_request_command_set(CTImageStorage, "1.2.3", 65536, 2) is None


def test_a_series_of_files_bypasses_pynetdicoms_request_path(derived_files, tmp_path,
                                                             monkeypatch):  # fmt: skip
    """Files that all go as they are never reach pynetdicom's send_c_store, and arrive whole;
    when one instance needs pynetdicom (a data set), the whole association goes its way."""
    from pynetdicom.association import Association

    real = Association.send_c_store
    calls = []
    monkeypatch.setattr(Association, "send_c_store",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))  # fmt: skip
    with storescp(tmp_path / "scp", extra_args=["+B"]) as scp:  # bit-preserving
        dest = Destination(scp.ae_title, scp.host, scp.port)
        res = send_instances(dest, derived_files, calling_ae_title=CALLING)
        assert res.ok, res.failure
        assert [o.status for o in res.outcomes] == [0] * len(derived_files) and calls == []
        received = {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in scp.received_files()
        }
        for f in derived_files:
            uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            assert _data_set_bytes(received[uid]) == _data_set_bytes(f)
        mixed = [pydicom.dcmread(derived_files[0]), *derived_files[1:3]]
        again = send_instances(dest, mixed, calling_ae_title=CALLING)
        assert again.ok and len(calls) == 3


def test_statuses_and_comments_come_back_per_instance(derived_files):
    """A pynetdicom acceptor with a small PDU answers a warning with a comment, then a failure:
    the first counts as acknowledged (on_ack called), the second stops the send with its status
    and comment, the rest are not sent."""
    from pydicom.dataset import Dataset
    from pynetdicom import evt

    answers = iter([(0xB000, "Coercion of data elements"), (0xA700, "disk full")])
    seen = []

    def on_store(event):
        seen.append((event.request.MessageID, str(event.dataset.SOPInstanceUID)))
        status, comment = next(answers)
        rsp = Dataset()
        rsp.Status, rsp.ErrorComment = status, comment
        return rsp

    ae = AE(ae_title="PICKY")
    ae.maximum_pdu_size = 4096
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])  # fmt: skip
    acked = []
    try:
        res = send_instances(Destination("PICKY", "127.0.0.1", port), derived_files,
                             calling_ae_title=CALLING,
                             on_ack=lambda uid, st: acked.append((uid, st)))  # fmt: skip
    finally:
        server.shutdown()
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in derived_files]
    assert seen == [(1, uids[0]), (2, uids[1])]
    assert acked == [(uids[0], 0xB000)]
    first, second, *rest = res.outcomes
    assert first.acknowledged and first.status == 0xB000
    assert first.detail == "Coercion of data elements"
    assert not second.acknowledged and second.status == 0xA700 and second.detail == "disk full"
    assert res.failure.kind is FailureKind.PERMANENT and "0xA700" in res.failure.reason
    assert all(not o.sent_now and not o.acknowledged for o in rest)


def test_a_peer_that_never_answers_is_transient_and_aborted(derived_files, tmp_path):
    with storescp(tmp_path, extra_args=["--sleep-during", "5"]) as scp:
        t0 = time.monotonic()
        res = send_instances(Destination(scp.ae_title, scp.host, scp.port), derived_files,
                             calling_ae_title=CALLING, dimse_timeout=1)  # fmt: skip
        took = time.monotonic() - t0
    assert res.failure is not None and res.failure.kind is FailureKind.TRANSIENT
    assert res.outcomes[0].detail == "no response" and not res.acknowledged
    assert took < 4.5  # the DIMSE timeout, not the peer's sleep, ended it


def test_the_association_thread_is_paused_only_once_it_waits():
    """_reactor_paused returns only when pynetdicom's association thread is blocked on its
    checkpoint, not merely flagged as paused: a thread let go a moment ago still has the flag
    set, and would take the next response off the queue."""
    from dicom_node.send import _reactor_paused

    class Assoc:  # the three attributes _reactor_paused reads, in the state of that moment
        is_established = True
        _is_paused = True
        _reactor_checkpoint = threading.Event()

    assoc = Assoc()
    assoc._reactor_checkpoint.set()
    blocked = threading.Event()

    def reactor():
        time.sleep(0.3)  # still on its way back to the checkpoint
        blocked.set()
        assoc._reactor_checkpoint.wait()

    thread = threading.Thread(target=reactor, daemon=True)
    thread.start()
    with _reactor_paused(assoc):
        assert blocked.is_set() and thread.is_alive()
        assert not assoc._reactor_checkpoint.is_set()
    thread.join(5)
    assert not thread.is_alive()  # let go at the end


@pytest.mark.parametrize(
    ("dcmconv", "as_is"),
    [(["+te"], True), (["+ti"], True), (["+tb"], True), (["+td"], True), (["-F", "+ti"], False)],
    ids=["explicit", "implicit", "big endian", "deflated", "no file meta"],
)
def test_files_are_described_from_their_head(derived_files, tmp_path, dcmconv, as_is):
    """_describe reads a file's File Meta and its data set only up to the SOP Instance UID:
    the same UIDs and transfer syntax as a full header read, the data set's offset where
    pynetdicom's split_dataset finds it; only a file with File Meta can go as it is."""
    from dicom_node.send import _describe

    path = tmp_path / "f.dcm"
    subprocess.run(["/usr/bin/dcmconv", *dcmconv, str(derived_files[0]), str(path)], check=True)
    it = _describe(path)
    full = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    assert (it.sop_class, it.sop_instance) == (full.SOPClassUID, full.SOPInstanceUID)
    assert it.as_is is as_is
    if as_is:
        assert it.transfer_syntax == full.file_meta.TransferSyntaxUID
        assert it.data_set_offset == split_dataset(path)[1] > 132
    else:  # no transfer syntax to send it in: refused before any connection
        assert it.data_set_offset == 0 and it.transfer_syntax == ""
        res = send_instances(Destination("NOBODY", "127.0.0.1", free_port()), [path],
                             calling_ae_title=CALLING)  # fmt: skip
        assert res.failure.kind is FailureKind.PERMANENT and "transfer syntax" in res.failure.reason
