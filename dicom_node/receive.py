"""The C-ECHO / C-STORE SCP: accept CT instances and acknowledge only what is durably stored.

Each handler is small on purpose. At association time :meth:`Receiver._on_requested` checks
the caller (AE title + address, called AE title) and the free disk; per C-STORE
:meth:`Receiver._on_store` parses the header, writes the bytes as they came through
:class:`~dicom_node.spool.Spool`, commits the index row through
:class:`~dicom_node.index.Indexer` and answers with a status. Grouping, geometry and inference
happen in later stages, never here.

A-ASSOCIATE-RJ answers (result, source, reason):

* caller not in ``allowed_callers``: permanent, service user, calling AE title not recognised
  (1, 1, 3);
* called AE title is not ours: permanent, service user, called AE title not recognised (1, 1, 7);
* free disk below ``storage.min_free_bytes``: transient, service provider (presentation),
  temporary congestion (2, 3, 1);
* more than ``node.max_associations`` at once: transient, local limit exceeded (2, 3, 2)
  (pynetdicom's own check).

Nothing here logs patient names or IDs: only UIDs, AE titles, addresses, statuses and durations.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.association_reactor import EventRequestHandler
from dicom_node.complete import hold_series
from dicom_node.config import NodeConfig
from dicom_node.db import utcnow
from dicom_node.header import (
    STATUS_INVALID_UID,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    STATUS_UNDECODABLE,
    InvalidInstance,
    read_dataset_header,
)
from dicom_node.index import Indexer, UidConflict
from dicom_node.spool import Spool, SpoolError, UnsafePathError
from dicom_node.tls import DeferredHandshake, handshake
from dicom_node.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.web import metrics

log = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

# C-STORE "Refused: SOP Class not supported" (PS3.4 B.2.3): also a STOW-RS FailureReason.
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_CONGESTION = (0x02, 0x03, 0x01)


_PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(tag: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    """One explicit VR little endian element with a short (16-bit) length."""
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


# (0002,0001) File Meta Information Version, OB (long form), 00 01 as pydicom writes it.
_META_VERSION = struct.pack("<HH2s2xI", 0x0002, 0x0001, b"OB", 2) + b"\x00\x01"


def _file_meta_bytes(sop_class: str, sop_uid: str, transfer_syntax: str, calling_ae: str) -> bytes:
    """The encoded file meta group that pynetdicom's ``encode_file_meta`` writes for these
    values, byte for byte (tests/test_receive_inprocess.py compares them), built directly: the
    FileMetaDataset and pydicom's writer took about 0.3 ms of CPU per instance. Values that are
    not plain ASCII, or too long for a short element, and empty UIDs (which pydicom's writer
    refuses) go through pydicom as before."""
    values = (sop_class, sop_uid, transfer_syntax, calling_ae)
    if not (all(values[:3]) and all(v.isascii() and len(v) < 0x8000 for v in values)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = transfer_syntax
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        meta.SourceApplicationEntityTitle = calling_ae
        return encode_file_meta(meta)
    body = b"".join(
        (
            _META_VERSION,
            _element(0x00020002, b"UI", sop_class.encode(), b"\x00"),
            _element(0x00020003, b"UI", sop_uid.encode(), b"\x00"),
            _element(0x00020010, b"UI", transfer_syntax.encode(), b"\x00"),
            _META_IMPLEMENTATION,
            _element(0x00020016, b"AE", calling_ae.encode(), b" "),
        )
    )
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


_META_IMPLEMENTATION = _element(
    0x00020012, b"UI", IMPLEMENTATION_CLASS_UID.encode(), b"\x00"
) + _element(0x00020013, b"SH", IMPLEMENTATION_VERSION_NAME.encode(), b" ")


@dataclass(frozen=True)
class StoreResult:
    """The answer to one store: DIMSE status, comment for the sender, what the index did, and
    the series the instance went into (when stored)."""

    status: int
    comment: str | None
    outcome: str
    series_uid: str | None = None


def _file_meta(part: bytes) -> tuple[FileMetaDataset, int]:
    """The file meta information of a Part 10 file and where its data set starts."""
    fp = io.BytesIO(part)
    try:
        read_preamble(fp, force=False)
        meta = _read_file_meta_info(fp)
    except Exception as exc:  # pydicom raises several kinds for a part that is not DICOM
        raise InvalidInstance(STATUS_UNDECODABLE, "not a DICOM Part 10 file") from exc
    if "TransferSyntaxUID" not in meta:
        raise InvalidInstance(STATUS_UNDECODABLE, "no transfer syntax in the file meta")
    return meta, fp.tell()


@dataclass
class AssociationInfo:
    """One open association, as ``dicom-node status`` shows it."""

    calling_ae: str
    peer: str
    port: int
    started: datetime
    stored: int = 0
    failed: int = 0
    _t0: float = field(default_factory=time.monotonic, repr=False)
    # Series this association stored into: held back if it ends without a release.
    series_uids: set[str] = field(default_factory=set, repr=False)

    def as_dict(self) -> dict:
        return {
            "calling_ae": self.calling_ae,
            "peer": self.peer,
            "port": self.port,
            "started": self.started.isoformat(timespec="seconds"),
            "stored": self.stored,
            "failed": self.failed,
        }


def _status(code: int, comment: str | None = None) -> Dataset | int:
    if comment is None:
        return code
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: 64 characters at most
    return ds


def _index_failure(exc: Exception) -> str:
    """The reason (an ErrorComment: 64 characters at most) for an index write that failed."""
    orig = getattr(exc, "orig", None)
    text = str(orig or exc).lower()
    if isinstance(orig, TimeoutError) or "locked" in text or "busy" in text:
        return "index write failed: database busy (locked); retry later"
    if "readonly" in text or "read-only" in text:
        return "index write failed: database is read-only"
    return f"index write failed: {type(exc).__name__}"


def _data_set_size(req) -> int:
    """Bytes of the C-STORE data set as received (no copy)."""
    data = req.DataSet
    return data.getbuffer().nbytes if isinstance(data, io.BytesIO) else 0


class _SharedSocketServer(ThreadedAssociationServer):
    """pynetdicom's server on a listening socket made elsewhere and shared by several
    processes (``node.receiver_processes``): the main process binds and listens, the others
    inherit the descriptor. Each process accepts when it gets to it, so a new connection goes to
    a process that is free to take it. The socket is non-blocking: a process that loses the race
    for a connection gets EAGAIN, which socketserver ignores."""

    def __init__(self, *args, listen_socket: socket.socket, **kwargs):
        self._listen_socket = listen_socket
        self._accepted: list[float] = []  # monotonic times of the last moment's accepts
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        self.socket.close()  # the unbound socket socketserver made
        self.socket = self._listen_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # listening already

    # Every process polls the shared socket, all of them wake for a new connection and the
    # first to accept it gets it: left to chance, 4 associations over 2 processes went 3 + 1 in
    # 3 of 8 rounds, and the process with 3 was the bottleneck while the other idled. So a
    # process that is serving associations waits a little before it accepts, longer the more
    # it serves, and a less busy process takes the connection first; when none does, the
    # busy one accepts after its wait.
    # (A few milliseconds were not enough: with the machine busy, the idle process woke 6 ms
    # after the busy one.)
    ACCEPT_DELAY_PER_ASSOCIATION_S = 0.02
    MAX_ACCEPT_DELAY_S = 0.1

    def get_request(self):
        serving = self._serving()
        if serving:
            time.sleep(min(serving * self.ACCEPT_DELAY_PER_ASSOCIATION_S, self.MAX_ACCEPT_DELAY_S))
        request = super().get_request()  # BlockingIOError when another process took it
        self._accepted.append(time.monotonic())
        return request

    # An accepted connection gets its association (a thread) a moment later, on another
    # thread: for that moment it is counted by its accept time.
    _STARTING_S = 0.2

    def _serving(self) -> int:
        """Associations this process serves: those not ended (a released one's thread may
        still run), and connections accepted in the last moment that have none yet."""
        now = time.monotonic()
        self._accepted = [t for t in self._accepted if now - t < self._STARTING_S]
        live = [
            a
            for a in self.ae.active_associations
            if not (a.is_released or a.is_aborted or a.is_rejected)
        ]
        young = sum(now - getattr(a, "created_at", 0.0) < self._STARTING_S for a in live)
        return len(live) + max(0, len(self._accepted) - young)


def listening_socket(address: str, port: int) -> socket.socket:
    """A non-blocking TCP socket bound to ``address:port`` and listening, that child processes
    can inherit. A plain bind: another listener on the port is "address already in use"."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pynetdicom's server
        sock.bind((address, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _NodeAE(AE):
    """An AE whose non-blocking server (``start_server(block=False)``) may run on a shared
    listening socket (:class:`_SharedSocketServer`) and creates event-driven associations
    (:mod:`dicom_node.association_reactor`) unless told not to; everything else is
    pynetdicom's own."""

    def __init__(self, *args, event_reactor: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.listen_socket: socket.socket | None = None
        self._event_reactor = event_reactor

    def make_server(self, address, *args, server_class=None, **kwargs):
        if server_class is ThreadedAssociationServer and self.listen_socket is not None:
            server_class = _SharedSocketServer
            kwargs["listen_socket"] = self.listen_socket
        if self._event_reactor:
            kwargs["request_handler"] = EventRequestHandler
        return super().make_server(address, *args, server_class=server_class, **kwargs)


class Receiver:
    """The node's storage SCP. ``start()`` returns at once; ``stop()`` closes it down.

    ``on_change`` is called (from a network thread) whenever an association opens or closes.

    With ``node.receiver_processes`` above 1 the main process makes the listening socket
    (:func:`listening_socket`, its descriptor is :attr:`listen_fd`) and the additional
    receiving processes (:mod:`dicom_node.receive_pool`) accept on the same socket, passed in
    as ``listen_socket``. ``extra_process`` says that this is one of them: it leaves the
    spool's temp files alone (the main process cleans them at start-up, before any other
    process receives).
    """

    def __init__(
        self,
        config: NodeConfig,
        session_factory,
        on_change: Callable[[], None] | None = None,
        extra_process: bool = False,
        listen_socket: socket.socket | None = None,
    ):
        self.config = config
        self.shared_port = config.node.receiver_processes > 1
        self.extra_process = extra_process
        self._listen_socket = listen_socket
        self.spool = Spool(config.storage.spool_dir, fsync=config.storage.fsync)
        # A store waits at most database.store_busy_timeout_ms for the index database: a
        # database locked by another process gets the sender a prompt 0xA700, not a timeout.
        self.indexer = Indexer(
            session_factory, time_budget_s=config.database.store_busy_timeout_ms / 1000
        )
        self.sessions = session_factory
        self.on_change = on_change
        self.ae_title = config.node.ae_title
        self._server = None
        self._assocs: dict[int, AssociationInfo] = {}
        self._lock = threading.Lock()
        # fsyncs run here so that they overlap with work on the association's own thread.
        self._io_pool = ThreadPoolExecutor(
            max_workers=2 * config.node.max_associations, thread_name_prefix="spool-io"
        )
        self.ae = self._make_ae()

    # -- set-up --------------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        n = self.config.node
        ae = _NodeAE(ae_title=n.ae_title, event_reactor=n.association_reactor == "event")
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_associations = n.max_associations
        ae.acse_timeout = n.acse_timeout_s
        ae.dimse_timeout = n.dimse_timeout_s
        ae.network_timeout = n.network_timeout_s
        ae.maximum_pdu_size = n.max_pdu
        # The called/calling AE checks live in _on_requested (they need the peer address too).
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.add_supported_context(Verification)
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        return ae

    def _ssl_context(self) -> DeferredHandshake | None:
        tls = self.config.node.tls
        if tls is None:
            return None
        # Client certificates chain to ca_file only (no system CAs). The handshake runs in each
        # association's thread (_on_conn_open), not in pynetdicom's accept loop.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        if tls.ca_file:
            ctx.load_verify_locations(str(tls.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
        return DeferredHandshake(ctx)

    def start(self) -> None:
        """Listen on the configured address and port (non-blocking)."""
        n = self.config.node
        if not self.extra_process:
            removed = self.spool.clean_incoming()
            if removed:
                log.info("removed %d partial files from an earlier crash", removed)
        if self.shared_port and self._listen_socket is None:
            self._listen_socket = listening_socket(n.bind_address, n.port)
        self.ae.listen_socket = self._listen_socket
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_interrupted),
            (evt.EVT_CONN_CLOSE, self._on_interrupted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = self.ae.start_server(
            (n.bind_address, n.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=self._ssl_context(),
        )
        log.info(
            "listening ae_title=%s address=%s port=%d max_associations=%d pid=%d",
            n.ae_title,
            n.bind_address,
            self.port,
            n.max_associations,
            os.getpid(),
        )

    @property
    def listening(self) -> bool:
        """True from :meth:`start` until :meth:`stop` (what /readyz reports)."""
        return self._server is not None

    @property
    def listen_fd(self) -> int | None:
        """The shared listening socket's descriptor (``node.receiver_processes`` above 1)."""
        return self._listen_socket.fileno() if self._listen_socket is not None else None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.config.node.port

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, give open associations ``grace_s`` to finish, then abort them."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # stops accepting; open associations keep running
        deadline = time.monotonic() + grace_s
        # Only established associations get the grace period: a connection still waiting for
        # its A-ASSOCIATE-RQ has nothing to lose.
        while time.monotonic() < deadline and any(
            a.is_alive() and a.is_established for a in server.active_associations
        ):
            time.sleep(0.05)
        for assoc in server.active_associations:
            assoc.abort()
        self._io_pool.shutdown(wait=True)
        log.info("receiver stopped")

    def active_associations(self) -> list[AssociationInfo]:
        with self._lock:
            return list(self._assocs.values())

    # -- association events --------------------------------------------------------------------
    def _on_conn_open(self, event) -> None:
        # A connection holds an association slot from now on. Until its A-ASSOCIATE-RQ is in, it
        # gets association_request_timeout_s: pynetdicom would wait acse_timeout_s for a peer
        # that sends nothing, and for ever for one that stops inside its request (the read
        # blocks on a socket without a timeout), so idle or half-open sockets could hold every
        # slot. _on_requested puts the association's own timeouts back.
        wait = self.config.node.association_request_timeout_s
        event.assoc.acse_timeout = wait
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            # Without TCP_NODELAY each small C-STORE-RSP waits for Nagle/delayed-ACK (~40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(wait)
            if isinstance(sock, ssl.SSLSocket):
                self._tls_handshake(sock, event.address)

    def _request_arrived(self, assoc) -> None:
        """The A-ASSOCIATE-RQ is in: from here on ``acse_timeout_s`` (release) and, for a PDU
        that stops half-way, ``network_timeout_s`` apply."""
        n = self.config.node
        assoc.acse_timeout = n.acse_timeout_s
        sock = assoc.dul.socket.socket
        if sock is not None:
            sock.settimeout(n.network_timeout_s)

    def _tls_handshake(self, sock: ssl.SSLSocket, address) -> None:
        """The handshake :class:`~dicom_node.tls.DeferredHandshake` left for this thread, within
        ``association_request_timeout_s``. On failure (no or untrusted client certificate, a
        caller without TLS, a silent caller) the socket is closed, so the association ends
        before anything is read."""
        error = handshake(sock, self.config.node.association_request_timeout_s)
        if error is not None:
            log.warning("TLS handshake failed peer=%s reason=%s", address[0], error)
        else:
            log.debug("TLS established peer=%s version=%s", address[0], sock.version())

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        self._request_arrived(assoc)
        rq = assoc.requestor.primitive
        calling = (rq.calling_ae_title or "").strip()
        called = (rq.called_ae_title or "").strip()
        address = assoc.requestor.address
        reject = None
        reason = ""
        if not any(c.matches(calling, address) for c in self.config.allowed_callers):
            reject, reason = REJECT_CALLING_AE, "caller not allowed"
        elif called != self.ae_title:
            reject, reason = REJECT_CALLED_AE, f"called AE title {called!r} is not ours"
        elif self._disk_low():
            reject, reason = REJECT_CONGESTION, "free disk below storage.min_free_bytes"
        if reject is None:
            return
        log.warning(
            "association rejected calling_ae=%s peer=%s called_ae=%s reason=%s",
            calling,
            address,
            called,
            reason,
        )
        self.indexer.record_event(
            "association_rejected",
            calling_ae=calling[:16],
            peer=address,
            detail={"reason": reason, "called_ae": called, "result_source_reason": reject},
        )
        assoc.acse.send_reject(*reject)
        # As pynetdicom's own rejection path: wait until the A-ASSOCIATE-RJ has gone out and
        # the peer has closed, before the reactor shuts the socket.
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _on_rejected(self, event) -> None:
        # Ours (_on_requested) and pynetdicom's own (association limit) alike.
        metrics.association(accepted=False)

    def _on_established(self, event) -> None:
        metrics.association(accepted=True)
        r = event.assoc.requestor
        info = AssociationInfo(
            calling_ae=r.ae_title, peer=r.address, port=r.port, started=datetime.now(UTC)
        )
        with self._lock:
            self._assocs[id(event.assoc)] = info
        log.info(
            "association established calling_ae=%s peer=%s pid=%d",
            info.calling_ae,
            info.peer,
            os.getpid(),
        )
        self._changed()

    def _on_released(self, event) -> None:
        self._closed(event, released=True)

    def _on_interrupted(self, event) -> None:
        # Whichever of A-ABORT and the closed connection comes first ends the association;
        # after a release, both find nothing left to do. The closed connection can also come
        # before EVT_RELEASED: the peer closes once it has the A-RELEASE-RP, which can be
        # before the association thread reports the release; is_released is set by then.
        self._closed(event, released=event.assoc.is_released)

    def _closed(self, event, released: bool) -> None:
        with self._lock:
            info = self._assocs.pop(id(event.assoc), None)
        if info is None:
            return
        log.info(
            "association %s calling_ae=%s peer=%s stored=%d failed=%d duration_s=%.2f",
            "released" if released else "aborted",
            info.calling_ae,
            info.peer,
            info.stored,
            info.failed,
            time.monotonic() - info._t0,
        )
        if not released and info.series_uids:
            self._hold_interrupted(info)
        self._changed()

    def _hold_interrupted(self, info: AssociationInfo) -> None:
        """The sender stopped mid-association (killed, network cut, aborted): what it stored
        may be part of a series. Hold those series for ``completion.interrupted_hold_s`` so
        that the rest can come (a resend ends the hold) before anything counts as complete."""
        hold_s = self.config.completion.interrupted_hold_s
        until = utcnow() + timedelta(seconds=hold_s)
        why = f"the association from {info.calling_ae} ended without a release"
        try:
            with self.sessions() as s:
                held = hold_series(s, info.series_uids, until, why)
                s.commit()
        except Exception:  # the series then completes after the quiet period, as before
            log.exception("cannot hold series of an aborted association")
            return
        log.warning(
            "association aborted: %d series held for %.0f s calling_ae=%s peer=%s",
            held,
            hold_s,
            info.calling_ae,
            info.peer,
        )

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # status reporting must never break the network side
                log.exception("on_change callback failed")

    # -- DIMSE ---------------------------------------------------------------------------------
    def _on_echo(self, event) -> int:
        return STATUS_SUCCESS

    def _disk_low(self) -> bool:
        try:
            return self.spool.free_bytes() < self.config.storage.min_free_bytes
        except OSError:
            return True

    def _discard(self, tmp_written: Future) -> None:
        """Remove a temp file that will not be placed (once its write has finished)."""
        with contextlib.suppress(SpoolError):  # if it failed, write_temp removed it already
            self.spool.discard(tmp_written.result())

    def _on_store(self, event) -> Dataset | int:
        """Store one instance durably; 0x0000 only once file and index row are committed."""
        t0 = time.perf_counter()
        assoc = event.assoc
        calling_ae = assoc.requestor.ae_title
        peer = assoc.requestor.address
        req = event.request
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        status, comment, outcome = self._store(event, calling_ae, peer, sop_uid)
        elapsed = time.perf_counter() - t0
        metrics.store(outcome, _data_set_size(req), elapsed)
        info = self._assocs.get(id(assoc))
        if info is not None:
            if status == STATUS_SUCCESS:
                info.stored += 1
            else:
                info.failed += 1
        log_fn = log.debug if status == STATUS_SUCCESS else log.warning
        log_fn(
            "c-store sop_instance_uid=%.64s calling_ae=%s status=0x%04X outcome=%s ms=%.1f%s",
            sop_uid,
            calling_ae,
            status,
            outcome,
            elapsed * 1000,
            f" reason={comment}" if comment else "",
        )
        return _status(status, comment)

    def _store(
        self, event, calling_ae: str, peer: str, sop_uid: str
    ) -> tuple[int, str | None, str]:
        req = event.request
        res = self.store_dataset(
            req.DataSet.getvalue(),
            str(req.AffectedSOPClassUID),
            sop_uid,
            str(event.context.transfer_syntax),
            calling_ae,
            peer,
        )
        info = self._assocs.get(id(event.assoc))
        if info is not None and res.series_uid is not None:
            info.series_uids.add(res.series_uid)
        return res.status, res.comment, res.outcome

    def store_part10(self, part: bytes, caller: str, peer: str) -> StoreResult:
        """Store one DICOM Part 10 file received another way than C-STORE (a STOW-RS part),
        through exactly the C-STORE path: the same checks, durable write, index and statuses.
        ``caller`` stands where the calling AE title would (at most 16 characters)."""
        try:
            meta, offset = _file_meta(part)
        except InvalidInstance as exc:
            self.indexer.record_refusal(exc.status, exc.reason, "", caller, peer)
            return StoreResult(exc.status, exc.reason, "rejected")
        sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
        sop_uid = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
        if sop_class not in ACCEPTED_SOP_CLASSES:
            reason = f"SOP class {sop_class or '(none)'} is not accepted (CT only)"
            self.indexer.record_refusal(
                STATUS_SOP_CLASS_NOT_SUPPORTED, reason, sop_uid, caller, peer
            )
            return StoreResult(STATUS_SOP_CLASS_NOT_SUPPORTED, reason, "rejected")
        return self.store_dataset(
            part[offset:], sop_class, sop_uid, str(meta.TransferSyntaxUID), caller, peer
        )

    def store_dataset(
        self,
        dataset: bytes,
        sop_class: str,
        sop_uid: str,
        transfer_syntax: str,
        calling_ae: str,
        peer: str,
    ) -> StoreResult:
        """Write one encoded data set durably and index it; 0x0000 only once both are done."""
        if self._disk_low():
            self.indexer.record_event(
                "store_refused",
                sop_instance_uid=sop_uid[:64],
                calling_ae=calling_ae,
                peer=peer,
                status=STATUS_OUT_OF_RESOURCES,
                detail="free disk below storage.min_free_bytes",
            )
            return StoreResult(STATUS_OUT_OF_RESOURCES, "free disk below minimum", "refused")

        meta = _file_meta_bytes(sop_class, sop_uid, transfer_syntax, calling_ae)

        # The temp file is written and fsync'd on a pool thread while this one parses the
        # header and checks the index: the fsync's wait overlaps with our CPU work.
        try:
            tmp_written = self._io_pool.submit(self.spool.write_temp, (_PREAMBLE, meta, dataset))
        except RuntimeError:  # pool shut down: the node is stopping
            return StoreResult(STATUS_OUT_OF_RESOURCES, "node is shutting down", "refused")
        # Hash the data set as the peer sent it (not our file meta, which names the caller): the
        # same instance resent, from any AE, is recognised as a duplicate by the index. Hashed
        # first because sha256 lets go of the GIL: the pool thread starts the write and its
        # fsync now, not after the header parse (pure Python) would have let it (measured: the
        # write started about 1.7 ms after it was submitted, see docs/SCALING.md).
        sha = hashlib.sha256(dataset).hexdigest()
        try:
            header = read_dataset_header(dataset, transfer_syntax, sop_class, sop_uid)
            path = self.spool.path_for(header.study_uid, header.series_uid, sop_uid)
        except (InvalidInstance, UnsafePathError) as exc:
            self._discard(tmp_written)
            code = exc.status if isinstance(exc, InvalidInstance) else STATUS_INVALID_UID
            reason = exc.reason if isinstance(exc, InvalidInstance) else str(exc)
            self.indexer.record_refusal(
                code,
                reason,
                sop_uid,
                calling_ae,
                peer,
                header=exc.header if isinstance(exc, InvalidInstance) else None,
            )
            return StoreResult(code, reason, "rejected")
        return self._place_and_index(tmp_written, header, path, sha, calling_ae, peer)

    def _place_and_index(
        self, tmp_written: Future, header, path: Path, sha: str, calling_ae: str, peer: str
    ) -> StoreResult:
        placed_new = False  # this store put a file where there was none
        previous: Path | None = None  # a hard link to the file this store replaces
        try:
            was_there = path.exists()
            if was_there:
                previous = self._keep_previous(path)
            size = self.spool.place(tmp_written.result(), path, sync_dir=False)
            placed_new = not was_there
            # The file's bytes are fsync'd and renamed into place. Its directory entry and the
            # index row become durable concurrently (two fsyncs in parallel rather than in
            # series); we answer only when both are. Should the row outlive a crash without
            # the entry, the sender got no answer and its resend rewrites the file.
            dir_synced = self._io_pool.submit(self.spool.sync_dir, path.parent)
            try:
                outcome = self.indexer.record(
                    header, self.spool.relative(path), size, sha, calling_ae, peer
                )
            finally:
                dir_synced.result()
        except Exception as exc:  # disk or index DB failed: not acknowledged, sender may retry
            self._discard(tmp_written)
            with contextlib.suppress(OSError):
                if placed_new:  # no index row will ever point at it: no orphan file
                    path.unlink()
                elif previous is not None:  # the index still describes the old file: put it back
                    os.replace(previous, path)
                    previous = None
            return self._store_failed(exc, header, calling_ae, peer)
        finally:
            if previous is not None:
                with contextlib.suppress(OSError):
                    previous.unlink()
        return StoreResult(STATUS_SUCCESS, None, outcome, header.series_uid)

    def _store_failed(self, exc: Exception, header, calling_ae: str, peer: str) -> StoreResult:
        if isinstance(exc, UidConflict):  # refused for good: the sender must fix its UIDs
            self.indexer.record_uid_conflict(exc, calling_ae, peer)
            return StoreResult(exc.status, exc.reason, "refused")
        if isinstance(exc, SpoolError):
            reason = str(exc.strerror)
        else:
            reason = _index_failure(exc)
            log.error("%s sop_instance_uid=%s", reason, header.sop_instance_uid)
        self.indexer.record_event(
            "store_failed",
            series_uid=header.series_uid,
            sop_instance_uid=header.sop_instance_uid,
            calling_ae=calling_ae,
            peer=peer,
            status=STATUS_OUT_OF_RESOURCES,
            detail=reason,
        )
        return StoreResult(STATUS_OUT_OF_RESOURCES, reason, "failed")

    @staticmethod
    def _keep_previous(path: Path) -> Path | None:
        """Hard-link the file about to be replaced (no copy), so that a failed index update can
        restore it; the caller removes the link. None where the file system refuses links."""
        keep = path.with_name(path.name + ".prev")
        try:
            with contextlib.suppress(FileNotFoundError):
                keep.unlink()  # left by a crash
            os.link(path, keep)
        except OSError as exc:
            log.warning("cannot keep the replaced file for a rollback: %s", exc.strerror)
            return None
        return keep
