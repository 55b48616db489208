"""The receiver's event-driven association reactors (dicom_node/association_reactor.py).

pynetdicom's own reactor threads poll every millisecond; the node's wait for an event. Checked
here: real series arrive through both (``node.association_reactor``), every step of an
association is driven by an event and never by a timer, an idle association's threads sleep,
the network timeout still ends a silent association, and the copied pynetdicom loops are still
the ones pynetdicom ships.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import queue
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import ACTIONS, DT_1, DT_2, TRANSITION_TABLE, StateMachine
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification
from pynetdicom.timer import Timer
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler
from sqlalchemy import func, select

from dicom_node import db
from dicom_node.association_reactor import MAX_IDLE_WAIT_S, EventAssociation
from dicom_node.config import parse_config
from dicom_node.receive import Receiver
from dicom_node.send import _reactor_paused
from tests.support.dcmtk import free_port
from tests.support.node import NodeProcess, make_instances, send_with_storescu

CT = "1.2.840.10008.5.1.4.1.1.2"
J2K = "1.2.840.10008.1.2.4.90"


def _receiver(tmp_path: Path, **node) -> Receiver:
    cfg = parse_config(
        {
            "node": {"port": free_port(), **node},
            "allowed_callers": [
                {"ae_title": "PYNETDICOM", "host": "127.0.0.0/8"},
                {"ae_title": "STORESCU", "host": "127.0.0.0/8"},
            ],
            "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_bytes": 0},
            "database": {"url": f"sqlite:///{tmp_path}/node.db"},
            "completion": {"quiet_seconds": 100000},
        }
    )
    db.upgrade(cfg.database.url)
    return Receiver(cfg, db.make_session_factory(db.make_engine(cfg.database.url)))


@pytest.fixture
def receiver(tmp_path):
    r = _receiver(tmp_path)
    r.start()
    yield r
    r.stop(grace_s=1)


def _associate(port: int):
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CT, J2K)
    assoc = ae.associate("127.0.0.1", port, ae_title="ACVTT")
    assert assoc.is_established
    return assoc


def _acceptor(receiver: Receiver):
    (acceptor,) = [a for a in receiver.ae.active_associations if a.is_acceptor]
    return acceptor


def _indexed(receiver: Receiver) -> int:
    with receiver.sessions() as s:
        return s.execute(select(func.count()).select_from(db.Instance)).scalar_one()


@pytest.mark.parametrize("reactor", ["event", "polling"])
def test_released_associations_are_released_not_aborted(tmp_path, sample_data, reactor):
    """storescu closes the connection as soon as it has the A-RELEASE-RP; with an event-driven
    DUL that close can be reported before the association thread reports the release. Each
    of these associations was released, so no series may be held as if its sender had been
    cut off. A real node process (its logging makes the race likely: once, 2 of 3 were)."""
    overrides = {
        "node": {"association_reactor": reactor},
        "completion": {"quiet_seconds": 100000},
    }
    sources = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))
    files = make_instances(sources, 16, tmp_path / "in")
    with NodeProcess(tmp_path / "node", overrides=overrides) as node:
        for k in range(8):
            result = send_with_storescu(files[2 * k : 2 * k + 2], node.port, called_ae="ACVTT")
            assert sorted(result.statuses.values()) == [0x0000] * 2
        log = node.log_tail(200000)
        assert node.sqlite("select count(*) from instances")[0][0] == 16
        held = node.sqlite("select count(*) from series where hold_until is not null")[0][0]
    assert log.count("association released calling_ae=STORESCU") == 8, log[-3000:]
    assert "association aborted" not in log
    assert held == 0


@pytest.mark.parametrize("reactor", ["event", "polling"])
def test_a_series_arrives_through_either_reactor(tmp_path, sample_data, reactor):
    r = _receiver(tmp_path, association_reactor=reactor)
    r.start()
    try:
        files = make_instances(sorted(sample_data.ct_dicom_repaired.glob("*.dcm")), 20, tmp_path)
        result = send_with_storescu(files, r.port, called_ae="ACVTT")
        assert result.returncode == 0
        assert sorted(result.statuses.values()) == [0x0000] * 20
        assert _indexed(r) == 20

        assoc = _associate(r.port)
        try:
            expected = EventAssociation if reactor == "event" else Association
            assert type(_acceptor(r)) is expected
        finally:
            assoc.release()
    finally:
        r.stop(grace_s=1)


def test_every_step_is_driven_by_an_event_not_a_timer(receiver, sample_data, tmp_path, caplog):
    """Echoes and stores over one association: no wait of either reactor thread may end by its
    timeout (each would cost MAX_IDLE_WAIT_S); pynetdicom's polling would not count at all.
    Nothing logs an error on the way (pynetdicom's own event handlers see its own message
    classes)."""
    caplog.set_level("DEBUG")
    files = make_instances(sorted(sample_data.ct_dicom_repaired.glob("*.dcm")), 10, tmp_path)
    datasets = [pydicom.dcmread(f) for f in files]
    assoc = _associate(receiver.port)
    try:
        server = _acceptor(receiver)
        assert isinstance(server, EventAssociation)
        before = (server.timed_out_waits, server.dul.timed_out_waits)
        t0 = time.monotonic()
        # Each request with the sender's reactor paused as the node's sender pauses it
        # (send._reactor_paused): pynetdicom's own pause can lose a response under load.
        for _ in range(30):
            with _reactor_paused(assoc):
                assert assoc.send_c_echo().Status == 0x0000
        for ds in datasets:
            with _reactor_paused(assoc):
                assert assoc.send_c_store(ds).Status == 0x0000
        elapsed = time.monotonic() - t0
        after = (server.timed_out_waits, server.dul.timed_out_waits)
        # A timer-driven step would also show as 40 x MAX_IDLE_WAIT_S = 20 s here.
        assert after == before, f"waits ended by timeout: {before} -> {after} in {elapsed:.1f}s"
        assert server.waits >= 40 and server.dul.waits >= 40  # the counters do count
    finally:
        assoc.release()
    assert _indexed(receiver) == 10
    assert [r.getMessage() for r in caplog.records if r.levelno >= 40] == []
    # pynetdicom's standard handler logged each C-STORE response it was given
    assert sum("C-STORE RSP" in r.getMessage() for r in caplog.records) >= 10


def test_an_idle_association_sleeps(receiver):
    """pynetdicom's reactors wake 1000 times a second each; the node's at most twice."""
    assoc = _associate(receiver.port)
    try:
        server = _acceptor(receiver)
        time.sleep(0.2)  # let the association settle
        waits = (server.waits, server.dul.waits)
        idle_s = 1.5
        time.sleep(idle_s)
        woke = (server.waits - waits[0], server.dul.waits - waits[1])
        most = idle_s / MAX_IDLE_WAIT_S + 2
        assert all(n <= most for n in woke), f"{woke} wake-ups in {idle_s}s (at most {most})"
        assert assoc.send_c_echo().Status == 0x0000  # still there and answering
    finally:
        assoc.release()


def test_network_timeout_ends_a_silent_association(tmp_path):
    r = _receiver(tmp_path, network_timeout_s=1)
    r.start()
    try:
        assoc = _associate(r.port)
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted, "the node did not end an association silent for 1 s"
    finally:
        r.stop(grace_s=1)


# The pynetdicom code that dicom_node/association_reactor.py copies or relies on, as shipped by
# the pynetdicom version it was written against (3.0.4). A change here means: compare the new
# upstream code with the copies, bring them in line, then update the digests.
UPSTREAM = {
    DULServiceProvider.__init__: "c82dafa9438ddf70",
    DULServiceProvider.run_reactor: "e3a10eb3a0931e48",
    DULServiceProvider.stop_dul: "28a7e0be126e7b30",
    DULServiceProvider.kill_dul: "5ceccf8dd01c2072",
    Association.__init__: "eb07516b8009ad8f",
    Association._run_reactor: "f28838c5559e462a",
    Association.kill: "8f9713666a7f4cff",
    RequestHandler._create_association: "05c8d12b79863cdb",
    # StoreResponseDIMSE.send_msg copies it; _GroupLength and _encoded_response replace the two
    # encoders, and WholeReadSocket the read, keeping their results
    DIMSEServiceProvider.send_msg: "a839cf2fb46976d9",
    # the standard log handlers that EventAssociation unbinds when they would log nothing, and
    # that the server binds again on each association it accepts
    Association._bind_defaults: "4cada43c3a193724",
    AssociationServer._bind_defaults: "4cada43c3a193724",
    DIMSEMessage.encode_msg: "73000c902c52832d",
    # store_response_command_set encodes what it builds for a C-STORE response
    DIMSEMessage.primitive_to_message: "71fd61d5997f0f0c",
    DIMSEMessage._set_command_group_length: "c3057c97344d5db3",
    AssociationSocket.recv: "6bc20a33b1b7cfe7",
    # EventDUL._read_pdu_data copies the first; its P-DATA path does what the rest do for a
    # P-DATA-TF PDU in Sta6 (decode, Evt10, DT-2, the primitive to DIMSE)
    DULServiceProvider._read_pdu_data: "19f2d4e38c13c835",
    DULServiceProvider._decode_pdu: "fc71dd1bf853e1ce",
    P_DATA_TF._generate_items: "55a5deea47745b72",
    P_DATA_TF._wrap_generate_items: "b2ab7ad6fe47ff4a",
    P_DATA_TF.to_primitive: "3cba1cd31f03fdf0",
    DT_2: "9ec543394e0b49eb",
    StateMachine.do_action: "9a883f44c7f31641",
    # send._store_files_as_is sends a file's C-STORE as this sends it with
    # STORE_SEND_CHUNKED_DATASET, and send._reactor_paused pauses the reactor as it does
    Association.send_c_store: "fa5a8127f349f8e7",
    # ... and writes each P-DATA-TF PDU to the socket where the state machine's DT-1 would,
    # handling a failed write as pynetdicom's socket does
    DT_1: "82e5c5d4114534fa",
    AssociationSocket.send: "1ea8158c0b51faca",
    # _timer_wait reads the timers' private start and end times
    Timer.__init__: "0088049875c5d495",
    Timer.remaining.fget: "4556c335c34ee264",
}


@pytest.mark.parametrize("fn", UPSTREAM, ids=lambda fn: fn.__qualname__)
def test_the_copied_pynetdicom_code_is_unchanged_upstream(fn):
    digest = hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]
    assert digest == UPSTREAM[fn], (
        f"pynetdicom's {fn.__qualname__} changed: review dicom_node/association_reactor.py"
    )


def _store_responses():
    """C-STORE responses as the receiver sends them: success, warnings and failures, with an
    Error Comment (odd and even length), an Offending Element, odd and even UIDs."""
    from pynetdicom.dimse_primitives import C_STORE

    out = []
    for status, extra in [
        (0x0000, {}),
        (0xB000, {"ErrorComment": "Coercion of data elements"}),
        (0xA700, {"ErrorComment": "free disk below minimum"}),
        (0xC213, {"ErrorComment": "SOP Instance UID already in series 1.2.3 #7"}),
        (0xA900, {"OffendingElement": [0x00080018, 0x0020000D]}),
        (0xC211, {"ErrorComment": ""}),
    ]:
        for sop_uid in ("1.2.3.4", "1.2.3.45", "1." + "9" * 62):
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = 7
            rsp.AffectedSOPClassUID = CT
            rsp.AffectedSOPInstanceUID = sop_uid
            rsp.Status = status
            for keyword, value in extra.items():
                setattr(rsp, keyword, value)
            out.append(rsp)
    return out


def _recording_association(max_pdu: int, record_messages: bool = True):
    """A pynetdicom acceptor association (never connected) whose DUL records the P-DATA sent,
    and whose EVT_DIMSE_SENT handler records the messages (with ``record_messages``; else no
    handler is bound to that event, pynetdicom's standard one included)."""
    from pynetdicom import evt
    from pynetdicom._globals import MODE_ACCEPTOR
    from pynetdicom._handlers import standard_dimse_sent_handler

    assoc = Association(AE(), MODE_ACCEPTOR)
    assoc.requestor.maximum_length = max_pdu
    pdus, messages = [], []
    assoc.dul = type("DUL", (), {"send_pdu": lambda _, p: pdus.append(p)})()
    assoc.unbind(evt.EVT_DIMSE_SENT, standard_dimse_sent_handler)
    if record_messages:
        assoc.bind(evt.EVT_DIMSE_SENT, lambda event: messages.append(event.message))
    return assoc, pdus, messages


@pytest.mark.parametrize("max_pdu", [0, 16382, 80])
@pytest.mark.parametrize("handler", [True, False], ids=["message handler", "no handler"])
def test_store_responses_are_encoded_as_pynetdicom_encodes_them(max_pdu, handler):
    """The receiver's C-STORE responses (StoreResponseDIMSE, its own command set encoder) are
    the same P-DATA bytes as pynetdicom's for every kind of response. With an EVT_DIMSE_SENT
    handler bound, the message it gets is pynetdicom's C_STORE_RSP; without one (the node's
    case) the response is encoded straight from the primitive. A PDU too small for one
    fragment goes through pynetdicom's fragmenting."""
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dsutils import encode

    from dicom_node.association_reactor import StoreResponseDIMSE, encode_command_set

    for rsp in _store_responses():
        theirs, their_pdus, _ = _recording_association(max_pdu)
        ours, our_pdus, messages = _recording_association(max_pdu, record_messages=handler)
        DIMSEServiceProvider(theirs).send_msg(rsp, 1)
        StoreResponseDIMSE(ours).send_msg(rsp, 1)
        sent = [[p.presentation_data_value_list for p in pdus] for pdus in (their_pdus, our_pdus)]
        assert sent[0] == sent[1]
        assert len(our_pdus) == 1 or max_pdu == 80
        if not handler:
            assert messages == []
            continue
        (message,) = messages
        assert type(message) is C_STORE_RSP
        assert encode_command_set(message.command_set) == encode(message.command_set, True, True)


def test_the_command_set_encoder_declines_what_it_does_not_encode():
    """A VR outside its list, or text that is not ASCII: None, and pynetdicom's encoder runs."""
    from pydicom.dataset import Dataset

    from dicom_node.association_reactor import encode_command_set

    ds = Dataset()
    ds.ErrorComment = "Größe"
    assert encode_command_set(ds) is None
    ds = Dataset()
    ds.add_new(0x00001234, "FD", 1.5)
    assert encode_command_set(ds) is None


def test_the_whole_read_socket_reads_what_pynetdicoms_reads():
    """WholeReadSocket.recv gives what pynetdicom's recv gives: the bytes asked for, over
    several sends; fewer when the peer closes first."""
    import queue
    import socket
    import threading

    from dicom_node.association_reactor import WholeReadSocket

    class _Assoc:  # what AssociationSocket's constructor reads
        class dul:  # noqa: N801
            event_queue = queue.Queue()

        network_timeout = 5

    def read(socket_class, chunks: list[bytes], asked: int) -> bytearray:
        ours, theirs = socket.socketpair()
        sock = socket_class(_Assoc(), client_socket=ours)

        def send():
            for chunk in chunks:
                theirs.sendall(chunk)
                time.sleep(0.01)
            theirs.close()

        sender = threading.Thread(target=send)
        sender.start()
        try:
            return sock.recv(asked)
        finally:
            sender.join()
            ours.close()

    for chunks, asked in [([b"a" * 5000, b"b" * 70000, b"c" * 3], 75003), ([b"xyz"], 10)]:
        got = read(WholeReadSocket, chunks, asked)
        assert isinstance(got, bytearray)
        assert got == read(AssociationSocket, chunks, asked) == b"".join(chunks)[:asked]


@pytest.mark.parametrize("level, bound", [("WARNING", False), ("INFO", True), ("DEBUG", True)])
def test_pynetdicoms_log_handlers_run_only_when_they_would_log(tmp_path, level, bound):
    """pynetdicom's standard handlers log each PDU and DIMSE message at INFO and DEBUG; with
    its logger above INFO (the node's setting) the receiver's associations run without them.
    Checked on a real association, because pynetdicom's server binds them again on every
    association it accepts (an unbind in the association alone was undone there)."""
    import logging

    from pynetdicom import evt
    from pynetdicom._handlers import standard_dimse_recv_handler, standard_pdu_sent_handler

    logger = logging.getLogger("pynetdicom")
    old = logger.level
    logger.setLevel(level)
    receiver = _receiver(tmp_path)
    receiver.start()
    try:
        assoc = _associate(receiver.port)
        try:
            acceptor = _acceptor(receiver)
            handlers = [h for h, _ in acceptor.get_handlers(evt.EVT_DIMSE_RECV)]
            handlers += [h for h, _ in acceptor.get_handlers(evt.EVT_PDU_SENT)]
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    finally:
        receiver.stop(grace_s=1)
        logger.setLevel(old)
    assert (standard_dimse_recv_handler in handlers) is bound
    assert (standard_pdu_sent_handler in handlers) is bound


def _store_request(priority=0, mover=None, sop_uid="1.2.3.4", size=3000, message_id=7):
    from pynetdicom.dimse_primitives import C_STORE

    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = sop_uid
    req.Priority = priority
    if mover is not None:
        req.MoveOriginatorApplicationEntityTitle, req.MoveOriginatorMessageID = mover
    req.DataSet = io.BytesIO(bytes(range(256)) * (size // 256) + b"\x01" * (size % 256))
    return req


def _pdatas(primitive, max_pdu: int) -> list:
    from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    msg = C_STORE_RQ() if isinstance(primitive, C_STORE) else C_ECHO_RQ()
    msg.primitive_to_message(primitive)
    return list(msg.encode_msg(3, max_pdu))


def _received(provider_cls, pdatas, bind_recv_handler: bool = False):
    """What a DIMSE provider of ``provider_cls`` puts on its message queue (and its DUL's
    event queue) for ``pdatas``, on an association with no EVT_DIMSE_RECV handler (the node's
    case) or with one."""
    from pynetdicom import evt
    from pynetdicom._globals import MODE_ACCEPTOR
    from pynetdicom._handlers import standard_dimse_recv_handler

    assoc = Association(AE(), MODE_ACCEPTOR)
    assoc.unbind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)
    seen = []
    if bind_recv_handler:
        assoc.bind(evt.EVT_DIMSE_RECV, lambda event: seen.append(event.message))
    events = queue.Queue()
    assoc.dul = type("DUL", (), {"event_queue": events})()
    provider = provider_cls(assoc)
    for p in pdatas:
        provider.receive_primitive(p)
    out = []
    while not provider.msg_queue.empty():
        context_id, prim = provider.msg_queue.get()
        fields = {
            k: getattr(prim, k, None)
            for k in (
                "MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
                "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID",
                "MessageIDBeingRespondedTo", "Status",
            )
        }  # fmt: skip
        data = prim.DataSet.getvalue() if hasattr(prim, "DataSet") else None
        out.append((context_id, type(prim).__name__, prim._context_id, fields, data))
    return out, list(events.queue), seen


@pytest.mark.parametrize("max_pdu", [0, 16382, 1000])
def test_store_requests_are_received_as_pynetdicom_receives_them(max_pdu, monkeypatch):
    """The receiver decodes a C-STORE request's command set itself (StoreResponseDIMSE,
    store_request_fields): the primitive handed to the association, its data set and context
    are pynetdicom's, for priorities, with and without a move originator, odd and even UIDs,
    data sets in one PDU or many; and no pydicom command set was decoded on the way."""
    from pynetdicom.dimse_messages import DIMSEMessage

    from dicom_node.association_reactor import StoreResponseDIMSE

    decoded = []
    real = DIMSEMessage.decode_msg
    monkeypatch.setattr(
        DIMSEMessage, "decode_msg", lambda self, *a: decoded.append(1) or real(self, *a)
    )
    requests = [
        _store_request(priority=p, mover=m, sop_uid=u, size=n)
        for p, m, u, n in [
            (0, None, "1.2.3.4", 3000),
            (1, ("MOVESCU", 12), "1.2.3.45", 40000),
            (2, ("A", 65535), "1." + "9" * 62, 5),
            (0, None, "1.2.840.10008.5.1.4.1.1.2", 2),
        ]
    ]
    for req in requests:
        pdatas = _pdatas(req, max_pdu)
        theirs = _received(DIMSEServiceProvider, pdatas)
        decoded.clear()
        ours = _received(StoreResponseDIMSE, pdatas)
        assert ours == theirs
        assert len(ours[0]) == 1 and not ours[1]
        assert decoded == []


def test_other_messages_and_handlers_take_pynetdicoms_path(monkeypatch):
    """A C-ECHO, a command set split over several values (a tiny PDU), an EVT_DIMSE_RECV
    handler, an invalid value (priority 3: pynetdicom aborts with Evt19) and a command
    fragment inside a data set: the same outcome as pynetdicom's, or an abort."""
    from pynetdicom.dimse_primitives import C_ECHO

    from dicom_node.association_reactor import StoreResponseDIMSE, store_request_fields

    echo = C_ECHO()
    echo.MessageID = 3
    cases = [_pdatas(echo, 0), _pdatas(_store_request(), 60)]
    for pdatas in cases:
        assert _received(StoreResponseDIMSE, pdatas) == _received(DIMSEServiceProvider, pdatas)

    pdatas = _pdatas(_store_request(), 0)
    ours = _received(StoreResponseDIMSE, pdatas, bind_recv_handler=True)
    theirs = _received(DIMSEServiceProvider, pdatas, bind_recv_handler=True)
    assert ours[:2] == theirs[:2] and len(ours[2]) == len(theirs[2]) == 1

    bad = _pdatas(_store_request(), 0)
    (context_id, command), *rest = bad[0].presentation_data_value_list
    priority = command.index(b"\x00\x00\x00\x07\x02\x00\x00\x00") + 8
    bad[0].presentation_data_value_list[0] = (
        context_id,
        command[:priority] + b"\x03\x00" + command[priority + 2 :],
    )
    assert store_request_fields(bad[0].presentation_data_value_list[0][1][1:])["Priority"] == 3
    ours, theirs = _received(StoreResponseDIMSE, bad), _received(DIMSEServiceProvider, bad)
    assert ours[:2] == theirs[:2] == ([], ["Evt19"])

    split = _pdatas(_store_request(size=40000), 16382)
    command_pdv = split[0].presentation_data_value_list[0]
    split[1].presentation_data_value_list.insert(0, command_pdv)
    messages, events, _ = _received(StoreResponseDIMSE, split)
    assert messages == [] and events == ["Evt19"]


def _p_data_tf(values: list[tuple[int, bytes]]) -> bytes:
    from pynetdicom.pdu_primitives import P_DATA

    primitive = P_DATA()
    primitive.presentation_data_value_list.extend(values)
    return P_DATA_TF(primitive).encode()


def _pynetdicoms_values(pdu: bytes):
    decoded = P_DATA_TF()
    decoded.decode(bytes(pdu))
    return decoded.to_primitive().presentation_data_value_list


def test_one_value_p_data_tf_pdus_are_encoded_as_pynetdicom_encodes_them():
    """p_data_tf_pdu (the sender's P-DATA-TF, send._store_files_as_is) writes pynetdicom's
    bytes for one value of any length and context, and p_data_values reads it back."""
    from dicom_node.association_reactor import p_data_tf_pdu, p_data_values

    for context_id, value in [
        (1, b"\x03" + b"c" * 101),
        (255, b"\x02"),
        (7, b"\x00" + bytes(16378)),
    ]:
        pdu = p_data_tf_pdu(context_id, value)
        assert pdu == _p_data_tf([(context_id, value)])
        assert p_data_values(pdu[6:]) == [(context_id, value)]


def test_p_data_values_are_decoded_as_pynetdicom_decodes_them():
    """p_data_values gives pynetdicom's (context ID, bytes) pairs, in order and as bytes, for
    one value or several, empty and odd-length data, a body given as bytes or bytearray; None
    for every malformed body on which pynetdicom's decoder fails."""
    from dicom_node.association_reactor import p_data_values

    cases = [
        [(1, b"\x03" + b"c" * 100)],
        [(3, b"\x00" + bytes(range(256)) * 300), (3, b"\x02" + b"z" * 7)],
        [(5, b"\x01"), (7, b"\x03abc"), (255, b"\x02")],
    ]
    for values in cases:
        pdu = _p_data_tf(values)
        for body in (pdu[6:], bytearray(pdu[6:])):
            ours = p_data_values(body)
            assert ours == _pynetdicoms_values(pdu) == values
            assert all(type(data) is bytes for _, data in ours)

    good = _p_data_tf([(1, b"\x03abcd")])
    bad = [
        good[:-1],  # the item runs past the end
        good + b"\x00\x00",  # a trailing fragment of an item header
        good + b"\x00\x00\x00\x05\x01",  # an item longer than what follows
        good + b"\x00\x00\x00\x00\x01",  # an item without its context ID
        # the same, followed by what would parse as an item if the empty one were taken
        good + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x02\x01\x03",
    ]
    for pdu in bad:
        assert p_data_values(pdu[6:]) is None
        with pytest.raises(Exception):  # noqa: B017 - pynetdicom's assert or struct.error
            _pynetdicoms_values(pdu)


class _BytesSocket:
    """The two reads _read_pdu_data makes, from bytes (what WholeReadSocket.recv returns)."""

    def __init__(self, data: bytes):
        self.data = bytearray(data)

    def recv(self, n: int) -> bytearray:
        out, self.data = self.data[:n], self.data[n:]
        return out


def _read_one_pdu(dul_read, pdu: bytes, state: str = "Sta6", queued=(), handler=None):
    """Read ``pdu`` with ``dul_read`` (pynetdicom's _read_pdu_data or the node's) on a new
    acceptor association in ``state``, then let the state machine act on what was queued, as
    the reactor does; returns the P-DATA value lists DIMSE received, the events left and how
    many PDUs took the direct path."""
    from pynetdicom._globals import MODE_ACCEPTOR

    assoc = EventAssociation(AE(), MODE_ACCEPTOR)
    if handler is not None:
        assoc.bind(handler, lambda event: None)
    received = []
    assoc.dimse.receive_primitive = lambda p: received.append(p.presentation_data_value_list)
    dul = assoc.dul
    dul.socket = _BytesSocket(pdu)
    dul.state_machine.current_state = state
    for event in queued:
        dul.event_queue.put(event)
    dul_read(dul)
    events = list(dul.event_queue.queue)
    while dul.event_queue.queue and dul.event_queue.queue[-1] == "Evt10":
        dul.event_queue.queue.pop()
        dul.state_machine.do_action("Evt10")
    return received, events, dul.direct_p_data


def test_p_data_skips_the_state_machine_only_where_dt2_is_all_it_would_do():
    """In Sta6, with nothing queued and no handler for the PDU's bytes, the PDU or the
    transition, the node's DUL hands a P-DATA-TF's values to DIMSE itself: the same values
    pynetdicom's state machine hands over (DT-2). Anywhere else, and for a malformed PDU,
    it queues what pynetdicom queues."""
    from pynetdicom import evt

    from dicom_node.association_reactor import EventDUL

    assert TRANSITION_TABLE[("Evt10", "Sta6")] == "DT-2"
    assert ACTIONS["DT-2"][1] is DT_2 and ACTIONS["DT-2"][2] == "Sta6"

    pdu = _p_data_tf([(1, b"\x03" + b"c" * 100), (1, b"\x02" + b"d" * 999)])
    theirs = _read_one_pdu(DULServiceProvider._read_pdu_data, pdu)
    ours = _read_one_pdu(EventDUL._read_pdu_data, pdu)
    assert theirs[:2] == ([_pynetdicoms_values(pdu)], ["Evt10"])
    assert ours[:3] == (theirs[0], [], 1)

    for kwargs in [
        {"state": "Sta7"},  # awaiting the release response: AR-6 instead of DT-2
        {"queued": ["Evt9"]},  # something to do before this PDU
        {"handler": evt.EVT_PDU_RECV},
        {"handler": evt.EVT_DATA_RECV},
        {"handler": evt.EVT_FSM_TRANSITION},
    ]:
        ours = _read_one_pdu(EventDUL._read_pdu_data, pdu, **kwargs)
        assert ours[2] == 0, kwargs
        assert ours[1] == _read_one_pdu(DULServiceProvider._read_pdu_data, pdu, **kwargs)[1]

    for broken in (pdu[:-1] + b"", pdu + b"\x00\x00\x00\x00\x01"):
        header = bytes([4, 0]) + (len(broken) - 6).to_bytes(4, "big")
        broken = header + broken[6:]
        ours = _read_one_pdu(EventDUL._read_pdu_data, broken)
        assert ours[:3] == ([], ["Evt19"], 0)
        assert _read_one_pdu(DULServiceProvider._read_pdu_data, broken)[:2] == ([], ["Evt19"])
    for other in (
        bytes.fromhex("0500000000040000 0000".replace(" ", "")),  # A-RELEASE-RQ
        pdu[:20],  # cut short by the peer: Evt17
        bytes([9, 0, 0, 0, 0, 0]),  # no such PDU type: Evt19
    ):
        ours = _read_one_pdu(EventDUL._read_pdu_data, other)
        assert ours[1] == _read_one_pdu(DULServiceProvider._read_pdu_data, other)[1]
        assert ours[2] == 0


def test_a_real_association_sends_its_data_past_the_state_machine(receiver, sample_data, tmp_path):
    """On a real association into the receiver (pynetdicom's logger at WARNING, as the node
    runs it), every P-DATA of the stores goes straight to DIMSE; every instance is indexed."""
    import logging

    logger = logging.getLogger("pynetdicom")
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        files = make_instances(sorted(sample_data.ct_dicom_repaired.glob("*.dcm")), 5, tmp_path)
        assoc = _associate(receiver.port)
        try:
            server = _acceptor(receiver)
            for f in files:
                assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
            assert server.dul.direct_p_data >= 10  # command set and data set of each store
        finally:
            assoc.release()
    finally:
        logger.setLevel(old)
    assert _indexed(receiver) == 5
