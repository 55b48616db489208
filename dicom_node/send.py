"""C-STORE SCU: send one series to one destination over one association, and say what happened.

:func:`send_instances` opens one association (TCP_NODELAY set as soon as the socket connects),
sends every instance that is not already acknowledged, checks each C-STORE response status and
returns a :class:`SendResult` with a per-instance outcome. It never raises for network or peer
problems; it classifies them instead:

* **transient** (retry later, with :func:`next_retry_delay`): connection refused or timed out,
  association aborted, no response within the timeouts, A-ASSOCIATE-RJ with result "rejected
  (transient)", a TLS handshake the peer closed or let time out.
* **permanent** (fail now, do not retry): A-ASSOCIATE-RJ "rejected (permanent)", every failure
  status on an instance (0xA7xx out of resources, 0xA9xx data set does not match SOP class,
  0xCxxx cannot understand, and any other failure code, e.g. 0x0122 SOP class not supported),
  no accepted presentation context for an instance, an input without valid UIDs, or a TLS
  handshake that failed on a certificate (untrusted, wrong host name) or protocol error.

A resend passes ``already_acknowledged=previous.acknowledged`` so only instances the peer has
not acknowledged go out again; when to resend is deliver.py's decision.
Success (0x0000) and warning statuses (0x0001, 0xBxxx) count as acknowledged.

A file goes as it is, its bytes after the File Meta Information read from disk in PDU-sized
pieces, never decoded, whenever the peer accepted a presentation context in the file's own
transfer syntax: the PACS gets exactly what was written. When every instance of a send goes so
(the node's derived series always do), :func:`_store_files_as_is` encodes each C-STORE request
itself and writes its P-DATA-TF PDUs to the association's socket, the bytes pynetdicom would
send, keeping pynetdicom's association, state machine and response decoding (docs/SCALING.md,
"The node's sends": 1.5 x the instances per second to Orthanc). Otherwise pynetdicom's
``send_c_store`` sends them: the file as it is (``STORE_SEND_CHUNKED_DATASET``), or read and
re-encoded where the peer accepted only the other uncompressed syntax or the file's meta
disagrees with its data set.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, cast

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification
from pynetdicom.status import code_to_category

from dicom_node.association_reactor import (
    p_data_tf_pdu,
    store_request_command_set,
    unbind_idle_log_handlers,
)
from dicom_node.config import Destination as DestinationConfig
from dicom_node.tls import DeferredHandshake, handshake
from dicom_node.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, is_valid_uid

__all__ = [
    "Destination",
    "FailureKind",
    "InstanceOutcome",
    "SendFailure",
    "SendResult",
    "associate",
    "classify_status",
    "find_stored_instances",
    "next_retry_delay",
    "send_instances",
]

log = logging.getLogger(__name__)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_CONTEXTS = 128

# Process-wide in pynetdicom, read by every ``send_c_store`` given a path; this module is the
# node's only caller, and it passes a path only where a context in the file's own transfer
# syntax was accepted (``_store_each``), which is what the setting needs.
_config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class Destination:
    """Where to send: the peer's AE title, host and port, and an optional TLS client context."""

    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = None
    tls_server_hostname: str | None = None  # defaults to ``host``

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"


def destination_from_config(dest: DestinationConfig) -> Destination:
    """The :class:`Destination` for a configured one, with its TLS client context: the peer's
    certificate verified against ``ca_file`` (else the system CAs) and its host name checked."""
    ctx = None
    if dest.tls is not None:
        ca = str(dest.tls.ca_file) if dest.tls.ca_file else None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.load_cert_chain(str(dest.tls.cert_file), str(dest.tls.key_file))
    return Destination(dest.ae_title, dest.host, dest.port, tls=ctx)


class FailureKind(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class SendFailure:
    """Why a send stopped: ``kind`` decides retry or not; ``reason`` is for people and logs."""

    kind: FailureKind
    reason: str
    # The peer asked for at least this long before a retry (HTTP Retry-After).
    retry_after_s: float | None = None


@dataclass(frozen=True)
class InstanceOutcome:
    """What happened to one instance in this attempt.

    ``status`` is the DIMSE status the peer returned (``None`` if it was not sent or no response
    came). ``acknowledged`` is true for success/warning now or in an earlier attempt
    (``sent_now`` false then).
    """

    sop_instance_uid: str
    acknowledged: bool
    status: int | None = None
    sent_now: bool = False
    detail: str = ""


@dataclass
class SendResult:
    """Outcome of one :func:`send_instances` call (one association at most)."""

    destination: object  # a Destination (DIMSE) or a stow.StowTarget (DICOMweb)
    outcomes: list[InstanceOutcome]
    failure: SendFailure | None = None
    elapsed_s: float = 0.0
    nodelay: bool | None = None  # TCP_NODELAY as read back from the socket, if connected

    @property
    def ok(self) -> bool:
        """Every instance acknowledged, now or earlier."""
        return self.failure is None and all(o.acknowledged for o in self.outcomes)

    @property
    def retryable(self) -> bool:
        return self.failure is not None and self.failure.kind is FailureKind.TRANSIENT

    @property
    def acknowledged(self) -> set[str]:
        """SOP Instance UIDs acknowledged so far (pass to the next attempt)."""
        return {o.sop_instance_uid for o in self.outcomes if o.acknowledged}

    @property
    def pending(self) -> list[str]:
        """SOP Instance UIDs still to send, in input order."""
        return [o.sop_instance_uid for o in self.outcomes if not o.acknowledged]

    def log_summary(self, what: str) -> None:
        """One log line: destination, counts, failure and seconds (never a credential)."""
        f = self.failure
        log.info(
            "%s finished dest=%s n=%d acked=%d sent_now=%d failure=%s seconds=%.3f",
            what,
            self.destination,
            len(self.outcomes),
            len(self.acknowledged),
            len(self.sent_now),
            f"{f.kind.value}: {f.reason}" if f else "none",
            self.elapsed_s,
        )

    @property
    def sent_now(self) -> list[str]:
        """SOP Instance UIDs acknowledged in this attempt."""
        return [o.sop_instance_uid for o in self.outcomes if o.sent_now and o.acknowledged]


def classify_status(status: int) -> FailureKind | None:
    """``None`` for success, warning or pending; otherwise the failure kind of a C-STORE status.

    Every failure status is permanent: 0xA7xx, 0xA9xx and 0xCxxx as the product rules demand, and
    unknown or other failure codes too, so that a peer that refuses data is never hammered.
    """
    if code_to_category(status) in ("Success", "Warning", "Pending"):
        return None
    return FailureKind.PERMANENT


def next_retry_delay(
    attempt: int, base: float = 2.0, cap: float = 300.0, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number ``attempt`` (0 = first retry): backoff with jitter.

    The ceiling doubles per attempt, ``c = min(cap, base * 2**attempt)``, and the delay is drawn
    uniformly from ``[c/2, c]`` ("equal jitter"): it keeps growing, yet senders that failed
    together do not retry together.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    rng = rng or random.Random()
    ceiling = min(cap, base * (2.0 ** min(attempt, 64)))
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


@dataclass
class _Item:
    source: Path | Dataset
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    # A file whose File Meta names the same SOP class and instance as its data set: the C-STORE
    # command takes them from the meta when the file's bytes go as they are.
    as_is: bool = False
    data_set_offset: int = 0  # of an as-is file: where its data set starts


def _describe(source: Path | str | Dataset) -> _Item:
    if isinstance(source, Dataset):
        ds = source
        src: Path | Dataset = source
        offset = 0
    else:
        src = Path(source)
        ds, offset = _read_head(src)
    meta = getattr(ds, "file_meta", None)
    # The dataset's own UIDs are what goes on the wire, so those must be valid (the file meta
    # alone is not enough: anonymisers sometimes blank the dataset's copy).
    sop_class = str(ds.get("SOPClassUID", "") or "")
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    ts = str(getattr(meta, "TransferSyntaxUID", "") or "")
    as_is = (
        isinstance(src, Path)
        and offset > 0
        and str(getattr(meta, "MediaStorageSOPClassUID", "") or "") == sop_class
        and str(getattr(meta, "MediaStorageSOPInstanceUID", "") or "") == sop_instance
    )
    return _Item(src, sop_class, sop_instance, ts, as_is, offset)


def _past_sop_instance_uid(tag, _vr, _length) -> bool:
    return tag > 0x00080018


def _read_head(path: Path) -> tuple[Dataset, int]:
    """A DICOM file's File Meta and its data set up to the SOP Instance UID (what
    :func:`_describe` needs), and where the data set starts (0: no File Meta, so the file
    cannot go as it is); read with pydicom's readers, stopping there rather than at the pixels.
    The whole header is read by ``dcmread`` where the file has no File Meta (then
    :func:`send_instances` refuses it for want of a transfer syntax), or a transfer syntax that
    pydicom does not know or that is deflated or big endian."""
    with open(path, "rb") as fp:
        if fp.read(132)[128:] != b"DICM":  # a bare data set: no transfer syntax to send it in
            return pydicom.dcmread(path, stop_before_pixels=True, force=True), 0
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                            stop_when=_not_file_meta)  # fmt: skip
        offset = fp.tell()
        ts = UID(str(meta.get("TransferSyntaxUID", "") or ""))
        if ts.is_transfer_syntax and not ts.is_deflated and ts.is_little_endian:
            ds = read_dataset(fp, is_implicit_VR=ts.is_implicit_VR, is_little_endian=True,
                              stop_when=_past_sop_instance_uid)  # fmt: skip
            ds.file_meta = FileMetaDataset(meta)
            return ds, offset
    return pydicom.dcmread(path, stop_before_pixels=True), offset


def _not_file_meta(tag, _vr, _length) -> bool:
    return tag >> 16 != 0x0002


def _to_send(assoc: Association, it: _Item) -> Path | Dataset:
    """What to hand to ``send_c_store`` for ``it``: the file itself, sent as it is, when the
    peer accepted the file's own transfer syntax for its SOP class; else the decoded data set,
    which pynetdicom re-encodes in a syntax the peer accepted."""
    if not isinstance(it.source, Path):
        return it.source
    if it.as_is and any(
        cx.abstract_syntax == it.sop_class and cx.transfer_syntax[0] == it.transfer_syntax
        for cx in assoc.accepted_contexts
    ):
        return it.source
    return pydicom.dcmread(it.source)


@dataclass
class _AssocInfo:
    connected: bool = False
    nodelay: bool | None = None
    reject: tuple[int, str, str] | None = None  # result, source, reason
    extra: list[str] = field(default_factory=list)
    tls_error: Exception | None = None  # the TLS handshake failed with this


def _on_conn_open(event: evt.Event, info: _AssocInfo) -> None:
    # Without TCP_NODELAY each small C-STORE PDU waits for the peer's delayed ACK (~40 ms).
    sock = event.assoc.dul.socket.socket
    info.connected = True
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        info.nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        if isinstance(sock, ssl.SSLSocket):
            info.tls_error = handshake(sock, event.assoc.connection_timeout)


def _tls_failure(exc: Exception, dest: Destination) -> SendFailure:
    """Certificate and protocol errors are configuration problems (permanent); a peer that
    closed or went silent during the handshake may be busy (transient)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return SendFailure(
            FailureKind.PERMANENT,
            f"TLS: certificate of {dest} not accepted: {exc.verify_message or exc}",
        )
    if isinstance(exc, ssl.SSLError) and not isinstance(
        exc, ssl.SSLEOFError | ssl.SSLZeroReturnError
    ):
        return SendFailure(
            FailureKind.PERMANENT, f"TLS handshake with {dest} failed: {exc.reason or exc}"
        )
    return SendFailure(
        FailureKind.TRANSIENT, f"TLS handshake with {dest} failed: {str(exc) or type(exc).__name__}"
    )


def _on_acse_recv(event: evt.Event, info: _AssocInfo) -> None:
    p = event.primitive
    if getattr(p, "result", None) in (0x01, 0x02):
        info.reject = (int(p.result), str(p.source_str), str(p.reason_str))


def associate(
    destination: Destination,
    calling_ae_title: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
    network_timeout: float = 60.0,
    connection_timeout: float = 10.0,
) -> tuple[Association, _AssocInfo]:
    """Request an association with TCP_NODELAY set on the socket as soon as it connects.

    ``contexts`` are (SOP class UID, transfer syntaxes) pairs. The returned association may be
    rejected, aborted or not connected; the info object records what happened (for
    classification). Used by :func:`send_instances`; public so that tests and ``echo`` can reuse it.
    """
    ae = AE(ae_title=calling_ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.connection_timeout = connection_timeout
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, list(syntaxes))
    info = _AssocInfo()
    tls_args = None
    if destination.tls is not None:
        tls_args = (
            DeferredHandshake(destination.tls),
            destination.tls_server_hostname or destination.host,
        )
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=tls_args,
        evt_handlers=[
            (evt.EVT_CONN_OPEN, _on_conn_open, [info]),
            (evt.EVT_ACSE_RECV, _on_acse_recv, [info]),
        ],
    )
    unbind_idle_log_handlers(assoc)  # for the data it sends: they build lines nobody keeps
    return assoc, info


def _contexts(items: Sequence[_Item]) -> list[tuple[str, list[str]]]:
    wanted: dict[str, list[str]] = {}
    for it in items:
        syntaxes = wanted.setdefault(it.sop_class, [])
        # Uncompressed data can be re-encoded by pynetdicom, so offer both little-endian forms.
        for ts in (
            (it.transfer_syntax, *_UNCOMPRESSED)
            if it.transfer_syntax in _UNCOMPRESSED
            else (it.transfer_syntax,)
        ):
            if ts not in syntaxes:
                syntaxes.append(ts)
    # One context per (class, syntax) lets the peer accept some syntaxes and refuse others.
    return [(cls, [ts]) for cls, tss in wanted.items() for ts in tss]


def _unread_rejection(assoc: Association) -> tuple[int, str, str] | None:
    """An A-ASSOCIATE-RJ that reached pynetdicom's DUL but that its ACSE never read.

    pynetdicom 3.0 races here: when a peer rejects and closes at once (dcmtk ``storescp --refuse``
    does), a busy requestor thread can find the socket already closed and abort the association
    before it reads the rejection waiting in the DUL's queue. The rejection is still the peer's
    answer, so look for it there rather than calling a permanent refusal a transient abort.
    """
    pending = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    for primitive in list(getattr(pending, "queue", ())):
        result = getattr(primitive, "result", None)
        if isinstance(primitive, A_ASSOCIATE) and result in (0x01, 0x02):
            return int(result), str(primitive.source_str), str(primitive.reason_str)
    return None


def _association_failure(assoc: Association, info: _AssocInfo, dest: Destination) -> SendFailure:
    if info.tls_error is not None:
        return _tls_failure(info.tls_error, dest)
    if info.reject is None:
        info.reject = _unread_rejection(assoc)
    if info.reject is not None:
        result, source, reason = info.reject
        kind = FailureKind.PERMANENT if result == 0x01 else FailureKind.TRANSIENT
        return SendFailure(
            kind, f"association rejected ({kind.value}) by {dest}: {reason} (source: {source})"
        )
    if not info.connected:
        return SendFailure(FailureKind.TRANSIENT, f"cannot connect to {dest}")
    if assoc.is_aborted:
        if not assoc.accepted_contexts and assoc.rejected_contexts:
            return SendFailure(
                FailureKind.PERMANENT, f"{dest} accepted none of the presentation contexts"
            )
        # Over TLS 1.3 a peer refuses our certificate after our side of the handshake is done:
        # its alert arrives as an abort, which pynetdicom only logs.
        hint = " (TLS: the peer may have refused our certificate)" if dest.tls else ""
        return SendFailure(FailureKind.TRANSIENT, f"association with {dest} aborted{hint}")
    return SendFailure(FailureKind.TRANSIENT, f"no association with {dest} (timeout)")


def send_instances(
    destination: Destination,
    instances: Sequence[Path | str | Dataset],
    *,
    calling_ae_title: str,
    already_acknowledged: Collection[str] = (),
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
    network_timeout: float = 60.0,
    connection_timeout: float = 10.0,
    on_ack: Callable[[str, int], None] | None = None,
) -> SendResult:
    """Send ``instances`` (file paths or datasets with file meta) over one association.

    Instances whose SOP Instance UID is in ``already_acknowledged`` are skipped and reported as
    acknowledged. Stops at the first failure; see the module docstring for the classification.
    ``on_ack(sop_instance_uid, status)`` is called as each acknowledgement arrives, so that the
    caller can record it before the association ends (a crash mid-send then loses little).
    """
    t0 = time.monotonic()
    done = set(already_acknowledged)
    items = [_describe(s) for s in instances]
    outcomes: dict[int, InstanceOutcome] = {}
    for idx, it in enumerate(items):
        if it.sop_instance in done:
            outcomes[idx] = InstanceOutcome(it.sop_instance, True, detail="acknowledged earlier")

    def result(failure: SendFailure | None, nodelay: bool | None = None) -> SendResult:
        full = [
            outcomes.get(i, InstanceOutcome(it.sop_instance, False, detail="not sent"))
            for i, it in enumerate(items)
        ]
        res = SendResult(
            destination, full, failure, elapsed_s=time.monotonic() - t0, nodelay=nodelay
        )
        res.log_summary("send")
        return res

    bad = [
        it
        for it in items
        if not (is_valid_uid(it.sop_class) and is_valid_uid(it.sop_instance))
        or not it.transfer_syntax
    ]
    if bad:
        return result(
            SendFailure(
                FailureKind.PERMANENT,
                f"{len(bad)} instance(s) lack a valid SOP Class/Instance UID or transfer syntax",
            )
        )
    todo = [i for i in range(len(items)) if i not in outcomes]
    if not todo:
        return result(None)
    contexts = _contexts([items[i] for i in todo])
    if len(contexts) > _MAX_CONTEXTS:
        return result(
            SendFailure(FailureKind.PERMANENT, f"{len(contexts)} presentation contexts needed")
        )

    assoc, info = associate(
        destination,
        calling_ae_title,
        contexts,
        acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout,
        network_timeout=network_timeout,
        connection_timeout=connection_timeout,
    )
    if not assoc.is_established:
        return result(_association_failure(assoc, info, destination), info.nodelay)

    failure: SendFailure | None = None
    clean = True  # False when the peer stopped answering: abort, since a release would wait
    try:
        failure, clean = _store_each(assoc, destination, items, todo, outcomes, on_ack)
    finally:
        if assoc.is_established:
            if clean:
                assoc.release()
            else:
                assoc.abort()
    return result(failure, info.nodelay)


def _store_each(
    assoc: Association,
    destination: Destination,
    items: Sequence[_Item],
    todo: Sequence[int],
    outcomes: dict[int, InstanceOutcome],
    on_ack: Callable[[str, int], None] | None,
) -> tuple[SendFailure | None, bool]:
    """C-STORE ``items[i]`` for each ``i`` in ``todo`` on an established association, recording
    each in ``outcomes``, up to the first failure. Returns that failure (None when every instance
    went) and whether the association can be released (False when the peer stopped answering).

    When every one of them is a file that goes as it is (the usual case: the node's own derived
    series), :func:`_store_files_as_is` sends them; otherwise pynetdicom's ``send_c_store``."""
    contexts = _as_is_contexts(assoc, [items[i] for i in todo])
    if contexts is not None:
        return _store_files_as_is(assoc, destination, items, todo, outcomes, on_ack, contexts)
    for msg_id, i in enumerate(todo, start=1):
        it = items[i]
        try:
            with _reactor_paused(assoc):  # pynetdicom's own pause has the gap described there
                rsp = assoc.send_c_store(_to_send(assoc, it), msg_id=msg_id)
        except ValueError as exc:  # no accepted presentation context for this instance
            outcomes[i] = InstanceOutcome(it.sop_instance, False, sent_now=True, detail=str(exc))
            return SendFailure(
                FailureKind.PERMANENT,
                f"{destination} refused SOP class {it.sop_class} in transfer syntax "
                f"{it.transfer_syntax}: {exc}",
            ), True
        status = rsp.get("Status") if rsp is not None else None
        comment = str(rsp.get("ErrorComment", "") or "") if rsp is not None else ""
        failure = _answered(assoc, destination, it, i, status, comment, outcomes, on_ack)
        if failure is not None:
            return failure, status is not None
    return None, True


def _answered(
    assoc: Association,
    destination: Destination,
    it: _Item,
    i: int,
    status: int | None,
    comment: str,
    outcomes: dict[int, InstanceOutcome],
    on_ack: Callable[[str, int], None] | None,
) -> SendFailure | None:
    """Record the peer's answer to the C-STORE of ``items[i]`` (``status`` None: no response
    came) and return the failure it means, if any."""
    if status is None:
        outcomes[i] = InstanceOutcome(it.sop_instance, False, sent_now=True, detail="no response")
        why = "aborted" if assoc.is_aborted else "timed out or closed"
        return SendFailure(
            FailureKind.TRANSIENT,
            f"association with {destination} {why} while sending "
            f"({sum(o.sent_now and o.acknowledged for o in outcomes.values())} acknowledged)",
        )
    status = int(status)
    kind = classify_status(status)
    outcomes[i] = InstanceOutcome(
        it.sop_instance, kind is None, status=status, sent_now=True, detail=comment
    )
    if kind is None:
        if on_ack is not None:
            on_ack(it.sop_instance, status)
        return None
    return SendFailure(
        kind,
        f"{destination} answered 0x{status:04X} for {it.sop_instance}"
        + (f": {comment}" if comment else ""),
    )


def _as_is_contexts(assoc: Association, items: Sequence[_Item]) -> list[int] | None:
    """The accepted presentation context of each item, when every item is a file whose File
    Meta agrees with its data set and the peer accepted its SOP class in the file's own
    transfer syntax; else None."""
    accepted: dict[tuple[str, str], int] = {}
    for cx in assoc.accepted_contexts:
        accepted.setdefault((cx.abstract_syntax, cx.transfer_syntax[0]), int(cx.context_id))
    ids = []
    for it in items:
        cx_id = accepted.get((it.sop_class, it.transfer_syntax))
        if not it.as_is or cx_id is None:
            return None
        ids.append(cx_id)
    return ids


@contextmanager
def _reactor_paused(assoc: Association) -> Iterator[None]:
    """Keep pynetdicom's association thread from taking DIMSE messages off the queue while this
    thread waits for its responses, as pynetdicom's ``send_c_store`` does around each request
    (tests/test_association_reactor.py pins that code), here once for a whole series.

    pynetdicom waits only for the thread's ``_is_paused`` flag, which is still true for a moment
    after the thread has been let go and before it looks at the queue: a response arriving then
    is taken by that thread and dropped, and the sender waits out the DIMSE timeout. So this also
    waits until the thread is blocked on the checkpoint (the event's waiters)."""
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    waiters = getattr(getattr(checkpoint, "_cond", None), "_waiters", None)
    try:
        while assoc.is_established and not (
            assoc._is_paused and (waiters is None or len(waiters) > 0)
        ):
            time.sleep(0.0001)
        yield
    finally:
        checkpoint.set()


@contextmanager
def _send_timeout(sock: socket.socket | None, seconds: float | None) -> Iterator[None]:
    """pynetdicom leaves a requestor's socket blocking with no timeout once connected: a peer
    that stops reading would hold a send forever. Within this block a send that makes no
    progress for ``seconds`` (the network timeout) fails instead."""
    if sock is None or seconds is None:
        yield
        return
    before = sock.gettimeout()
    sock.settimeout(seconds)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(before)


def _store_files_as_is(
    assoc: Association,
    destination: Destination,
    items: Sequence[_Item],
    todo: Sequence[int],
    outcomes: dict[int, InstanceOutcome],
    on_ack: Callable[[str, int], None] | None,
    contexts: Sequence[int],
    priority: int = 2,
) -> tuple[SendFailure | None, bool]:
    """:func:`_store_each` for files that all go as they are, without pynetdicom's DIMSE
    request path: each command set is encoded by
    :func:`~dicom_node.association_reactor.store_request_command_set` and the file's bytes after
    its File Meta go in PDU-sized pieces, one presentation data value per P-DATA-TF PDU, as
    pynetdicom's ``DIMSEMessage.encode_msg`` and ``P_DATA_TF`` would send them; the response is
    pynetdicom's, as its DUL and DIMSE provider decoded it. The same bytes reach the peer as through
    ``send_c_store`` with ``STORE_SEND_CHUNKED_DATASET`` (with its default priority, 2: low),
    for less of the sender's CPU (docs/SCALING.md, "The node's sends")."""
    max_pdu = int(assoc.acceptor.maximum_length or 0)
    dul, dimse = assoc.dul, assoc.dimse
    # Each PDU goes straight to the DUL's socket where the state machine would only send it
    # (DT-1 in Sta6) and no handler wants to see it; else through the DUL's queue, as
    # pynetdicom's path does.
    raw: socket.socket | None = None
    if dul.socket is not None and not any(
        assoc.get_handlers(e) for e in (evt.EVT_PDU_SENT, evt.EVT_DATA_SENT)
    ):
        raw = dul.socket.socket

    def send_value(context_id: int, value: bytes) -> bool:
        if raw is None:
            dul.send_pdu(_p_data(context_id, value))
            return True
        try:
            raw.sendall(p_data_tf_pdu(context_id, value))
            return True
        except OSError:  # closed, reset, or no progress within the timeout
            dul.event_queue.put("Evt17")  # what pynetdicom's socket does: the DUL closes
            return False

    with _reactor_paused(assoc), _send_timeout(raw, assoc.network_timeout):
        for msg_id, (i, cx_id) in enumerate(zip(todo, contexts, strict=True), start=1):
            it = items[i]
            command = store_request_command_set(it.sop_class, it.sop_instance, msg_id, priority)
            if command is None:  # a message id past 65535: more than one association can number
                outcomes[i] = InstanceOutcome(it.sop_instance, False, detail="not sent")
                return SendFailure(
                    FailureKind.TRANSIENT, f"message id {msg_id} does not fit a C-STORE request"
                ), True
            source = cast(Path, it.source)
            values = _c_store_values(command, source, it.data_set_offset, max_pdu)
            if dul.state_machine.current_state != "Sta6" or not all(
                send_value(cx_id, value) for value in values
            ):
                return _answered(assoc, destination, it, i, None, "", outcomes, on_ack), False
            _cx, rsp = dimse.get_msg(block=True)
            status = comment = None
            if (
                isinstance(rsp, C_STORE)
                and rsp.is_valid_response
                and rsp.MessageIDBeingRespondedTo == msg_id
            ):
                status, comment = rsp.Status, rsp.ErrorComment
            elif rsp is not None:
                log.error("send: an invalid C-STORE response from %s", destination)
            failure = _answered(
                assoc, destination, it, i, status, str(comment or ""), outcomes, on_ack
            )
            if failure is not None:
                return failure, status is not None
    return None, True


def _c_store_values(command: bytes, path: Path, offset: int, max_pdu: int) -> Iterator[bytes]:
    """The presentation data values of a C-STORE request: its encoded ``command`` set, then
    the bytes of the file at ``path`` from ``offset`` on, each in pieces that fit a PDU of
    ``max_pdu`` bytes (0: any length), each value to go in a P-DATA of its own, as pynetdicom's
    ``DIMSEMessage.encode_msg`` sends a file's data set. The first byte of each value (PS3.8
    E.2): bit 0 command, bit 1 last fragment."""
    piece = max_pdu - 6 if max_pdu else -1
    for last, fragment in _fragments(BytesIO(command), piece):
        yield (b"\x03" if last else b"\x01") + fragment
    with open(path, "rb") as f:
        f.seek(offset)
        for last, fragment in _fragments(f, piece):
            yield (b"\x02" if last else b"\x00") + fragment


def _fragments(stream: BinaryIO, size: int) -> Iterator[tuple[bool, bytes]]:
    """(is the last, bytes) pieces of ``stream`` of ``size`` bytes (-1: all in one); one
    empty last piece for an empty stream, as pynetdicom sends it."""
    data = stream.read(size)
    while True:
        more = stream.read(size) if data else b""
        yield not more, data
        if not more:
            return
        data = more


def _p_data(context_id: int, value: bytes) -> P_DATA:
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, value))
    return pdata


def find_stored_instances(
    destination: Destination,
    *,
    calling_ae_title: str,
    study_uid: str,
    series_uid: str,
    timeout: float = 30.0,
) -> set[str] | None:
    """The SOP Instance UIDs of ``series_uid`` that ``destination`` holds, by C-FIND at IMAGE
    level (Study Root); None when it cannot tell (no C-FIND service, refused, timed out).

    Asked before resending a series whose last attempt was cut off: an instance the PACS holds
    under our UID was stored, even if its acknowledgement never reached our database.
    """
    assoc, _info = associate(
        destination,
        calling_ae_title,
        [
            (
                StudyRootQueryRetrieveInformationModelFind,
                [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
            )
        ],
        acse_timeout=timeout,
        dimse_timeout=timeout,
        network_timeout=timeout,
        connection_timeout=min(timeout, 10.0),
    )
    if not assoc.is_established:
        return None
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.SOPInstanceUID = ""
    found: set[str] = set()
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = int(status.Status) if status is not None and "Status" in status else None
            if code in (0xFF00, 0xFF01):
                uid = str(getattr(identifier, "SOPInstanceUID", "") or "")
                if is_valid_uid(uid):
                    found.add(uid)
            elif code != 0x0000:
                return None  # failed, cancelled or no answer: we cannot tell
    except (ValueError, RuntimeError) as exc:  # no accepted context, association ended
        log.info("C-FIND not possible dest=%s: %s", destination, exc)
        return None
    finally:
        if assoc.is_established:
            assoc.release()
    return found


def echo(
    destination: Destination, *, calling_ae_title: str, timeout: float = 10.0
) -> tuple[int | None, SendFailure | None, float]:
    """C-ECHO ``destination`` over an association made exactly as for sending (TCP_NODELAY,
    TLS handshake and certificate checks, failure classification).

    Returns (status or None, failure or None, seconds).
    """
    t0 = time.perf_counter()
    assoc, info = associate(
        destination,
        calling_ae_title,
        [(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])],
        acse_timeout=timeout,
        dimse_timeout=timeout,
        network_timeout=timeout,
        connection_timeout=timeout,
    )
    if not assoc.is_established:
        return None, _association_failure(assoc, info, destination), time.perf_counter() - t0
    try:
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    status = int(rsp.Status) if rsp and "Status" in rsp else None
    failure = None
    if status is None:
        failure = SendFailure(FailureKind.TRANSIENT, f"{destination} gave no C-ECHO response")
    return status, failure, time.perf_counter() - t0
