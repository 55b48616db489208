"""Event-driven reactors for the receiver's associations (pynetdicom 3.0).

pynetdicom runs two threads per association, and both poll:

- the DUL reactor checks its socket and its queues, and sleeps 1 ms whenever there was nothing
  to do (``DULServiceProvider._run_loop_delay``);
- the association reactor sleeps 1 ms before every look for a complete DIMSE message
  (``Association._run_reactor``'s ``time.sleep(0.001)``).

So each step of a C-STORE waits up to a millisecond for the next poll, and every open
association wakes its two threads about a thousand times a second even when idle. With several
senders those wake-ups fight over one interpreter lock with the threads that store.

The classes here keep pynetdicom's state machine, PDU and DIMSE code, and change only how the
two threads wait:

- the DUL thread blocks in ``poll`` on its socket and on a wake-up socket pair, which every
  put on its input queues (primitives to send, state-machine events) and every kill writes to;
- the association thread blocks on a :class:`threading.Event` that is set when a DIMSE message
  is complete, when the DUL hands up an A-RELEASE or A-ABORT, when the DUL thread ends and when
  the association is killed.

Both still wake at least every ``MAX_IDLE_WAIT_S`` so that the ARTIM and network-idle timers
expire on time. The two loops are pynetdicom 3.0.4's own, with only the wait replaced;
tests/test_association_reactor.py fails when pynetdicom's versions of them change, so that an
upgrade reviews these copies. ``node.association_reactor: polling`` goes back to pynetdicom's
reactors.

With the event-driven reactor the receiver's associations also read each PDU into one buffer
(:class:`WholeReadSocket`), encode C-STORE responses without pydicom's writer
(:class:`StoreResponseDIMSE`), and leave pynetdicom's standard log handlers unbound when its
logger would drop their lines; each gives pynetdicom's own result (docs/SCALING.md, "Where the
interpreter's time goes", third and fourth passes). An established association's P-DATA-TF
PDUs go from the DUL thread to DIMSE directly, as the state machine's DT-2 hands them over,
where nothing else would happen on the way (:meth:`EventDUL._read_pdu_data`; fifth pass).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from io import BytesIO
from typing import cast

from pynetdicom import _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

log = logging.getLogger(__name__)
# pynetdicom's logger: the copied DUL code logs its errors where pynetdicom's logs them.
LOGGER = logging.getLogger("pynetdicom.dul")

_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)

# The longest a reactor thread sleeps without an event: the granularity of the ARTIM and
# network-idle timers, and the idle cost (two wake-ups a second per thread).
MAX_IDLE_WAIT_S = 0.5


class _WakingQueue(queue.Queue):
    """A queue that calls ``wake`` after every put."""

    def __init__(self, wake: Callable[[], None]):
        super().__init__()
        self._wake = wake

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _WakingFlag:
    """A boolean attribute that pynetdicom sets directly to stop a reactor thread
    (``DULServiceProvider._kill_thread``, ``Association._kill``): setting it true also calls
    the owner's ``wake()``, so that the thread sees it at once, not at its next timeout."""

    def __set_name__(self, owner, name: str) -> None:
        self._key = f"{name}_flag"

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return obj.__dict__.get(self._key, False)

    def __set__(self, obj, value: bool) -> None:
        obj.__dict__[self._key] = value
        if value:
            obj.wake()


def _timer_wait(timer, cap: float) -> float:
    """Seconds until ``timer`` (pynetdicom's Timer) expires, at most ``cap``; ``cap`` when it
    is not running or never expires."""
    if timer.timeout is None or timer._start_time is None or timer._end_time is not None:
        return cap
    return min(cap, max(0.0, timer.remaining))


class EventDUL(DULServiceProvider):
    """pynetdicom's DUL provider, waiting in ``poll`` instead of sleeping 1 ms per loop."""

    def __init__(self, assoc: EventAssociation):
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_pending = False
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_fd = self._wake_r.fileno()
        self._poller = select.poll()
        self._poller.register(self._wake_fd, select.POLLIN)
        self._polled_fd = -1  # the association socket's descriptor while it is registered
        # Waits that ended by their timeout with nothing to do (diagnostics and tests: a step of
        # an association should never wait for a timer), and every wait, however it ended.
        self.timed_out_waits = 0
        self.waits = 0
        # P-DATA-TF PDUs handed to DIMSE without the state machine (_read_pdu_data).
        self.direct_p_data = 0
        super().__init__(assoc)
        self.event_queue = _WakingQueue(self.wake)
        self.to_provider_queue = _WakingQueue(self.wake)
        self.to_user_queue = _WakingQueue(assoc.wake)

    # Set directly by pynetdicom (``stop_dul``) as well as by ``kill_dul``.
    _kill_thread = _WakingFlag()

    def wake(self) -> None:
        """Make the reactor thread look at its queues now (any thread may call this).

        The reactor thread itself never needs waking (it looks at its queues before it waits
        again), and one pending wake-up byte is enough: both cases skip the system call."""
        if self._wake_pending or threading.current_thread() is self:
            return
        self._wake_pending = True
        # BlockingIOError: wake-ups are pending already; OSError: the reactor has finished.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _drain_wakes(self) -> None:
        # Cleared before reading: a wake after this point sends a new byte.
        self._wake_pending = False
        with contextlib.suppress(OSError):  # BlockingIOError: drained; else: closed
            while self._wake_r.recv(4096):
                pass

    def _wait_for_event(self) -> None:
        """Block until the socket is readable, a wake-up arrives or a timer may expire."""
        timeout = _timer_wait(self.artim_timer, MAX_IDLE_WAIT_S)
        raw = getattr(self.socket, "socket", None)
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return  # decrypted bytes are buffered where select cannot see them
        # poll, not select: no limit on descriptor numbers (max_associations goes to 1024).
        # One poll object for the association's life; the socket is registered while it is
        # connected (its number may be reused by another socket once it is closed).
        fd = raw.fileno() if raw is not None and self.socket._is_connected else -1
        if fd != self._polled_fd:
            if self._polled_fd >= 0:
                with contextlib.suppress(KeyError, ValueError):
                    self._poller.unregister(self._polled_fd)
            if fd >= 0:
                self._poller.register(fd, select.POLLIN)
            self._polled_fd = fd
        self.waits += 1
        try:
            ready = self._poller.poll(timeout * 1000)
        except (OSError, ValueError):
            # The socket closed under us: the next loop turns that into Evt17.
            time.sleep(self._run_loop_delay)
            self._drain_wakes()
            return
        if not ready:
            self.timed_out_waits += 1
        # A wake-up byte still in flight keeps _wake_pending set: the next poll sees it.
        if any(ready_fd == self._wake_fd for ready_fd, _ in ready):
            self._drain_wakes()

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor``, with its idle
        ``time.sleep(self._run_loop_delay)`` replaced by :meth:`_wait_for_event`."""
        try:
            self._run_reactor()
        finally:
            self.assoc.wake()  # the association reactor checks ``dul.is_alive()``
            self._wake_r.close()
            self._wake_w.close()

    def _run_reactor(self) -> None:
        self._idle_timer.start()
        sleep = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                self._wait_for_event()

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                log.error("Exception in the DUL reactor, aborting association")
                log.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            sleep = False

    def _p_data_goes_straight(self) -> bool:
        """Whether a P-DATA-TF PDU read now may skip the state machine: in Sta6 (association
        established) pynetdicom's state machine answers it (Evt10) with DT-2, which hands its
        P-DATA primitive to DIMSE and stays in Sta6. That is all it does when no event is
        queued ahead of it and no handler wants the PDU's bytes, the decoded PDU or the
        transition (the node binds none of the three)."""
        if self.state_machine.current_state != "Sta6":
            return False
        if self.event_queue.queue or self._recv_pdu.queue:
            return False
        get_handlers = self.assoc.get_handlers
        return not (
            get_handlers(evt.EVT_DATA_RECV)
            or get_handlers(evt.EVT_PDU_RECV)
            or get_handlers(evt.EVT_FSM_TRANSITION)
        )

    def _read_pdu_data(self) -> None:
        """pynetdicom 3.0.4's ``DULServiceProvider._read_pdu_data``, where a P-DATA-TF PDU
        that :meth:`_p_data_goes_straight` lets through is decoded by :func:`p_data_values`
        and handed to DIMSE here, as DT-2 does, instead of going through the PDU classes, the
        event queue and the state machine (which copied its data four times on the way).
        Every other PDU, and a P-DATA-TF that :func:`p_data_values` declines, takes
        pynetdicom's path."""
        bytestream = bytearray()
        self.socket = cast("AssociationSocket", self.socket)

        # Try and read the PDU type and length from the socket
        try:
            bytestream.extend(self.socket.recv(6))
        except (OSError, TimeoutError) as exc:
            # READ_PDU_EXC_A
            LOGGER.error("Connection closed before the entire PDU was received")
            LOGGER.exception(exc)
            # Evt17: Transport connection closed
            self.event_queue.put("Evt17")
            return

        try:
            # Byte 1 is always the PDU type
            # Byte 2 is always reserved
            # Bytes 3-6 are always the PDU length
            pdu_type, _, pdu_length = struct.unpack(">BBL", bytestream)
        except struct.error:
            # READ_PDU_EXC_B
            # LOGGER.error("Insufficient data received to decode the PDU")
            # Evt17: Transport connection closed
            self.event_queue.put("Evt17")
            return

        # If the `pdu_type` is unrecognised
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            # READ_PDU_EXC_C
            LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
            # Evt19: Unrecognised or invalid PDU received
            self.event_queue.put("Evt19")
            return

        # Try and read the rest of the PDU
        try:
            body = self.socket.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            # READ_PDU_EXC_D
            LOGGER.error("Connection closed before the entire PDU was received")
            LOGGER.exception(exc)
            # Evt17: Transport connection closed
            self.event_queue.put("Evt17")
            return

        # Check that the PDU data was completely read
        if len(body) != pdu_length:
            # READ_PDU_EXC_E
            # Evt17: Transport connection closed
            LOGGER.error(
                f"The received PDU is shorter than expected ({6 + len(body)} of "
                f"{6 + pdu_length} bytes received)"
            )
            self.event_queue.put("Evt17")
            return

        if pdu_type == 0x04 and self._p_data_goes_straight():
            values = p_data_values(body)
            if values is not None:
                primitive = P_DATA()  # its list filled as P_DATA_TF.to_primitive fills it
                primitive.presentation_data_value_list.extend(values)
                self.direct_p_data += 1
                self.assoc.dimse.receive_primitive(primitive)
                return

        bytestream += body
        try:
            # Decode the PDU data, get corresponding FSM event
            pdu, event = self._decode_pdu(bytestream)
            self.event_queue.put(event)
        except Exception as exc:
            # READ_PDU_EXC_F
            LOGGER.error("Unable to decode the received PDU data")
            LOGGER.exception(exc)
            # Evt19: Unrecognised or invalid PDU received
            self.event_queue.put("Evt19")
            return

        self._recv_pdu.put(pdu)


_PDV_HEADER = struct.Struct(">IB").unpack_from


def p_data_values(body: bytes | bytearray) -> list[tuple[int, bytes]] | None:
    """The presentation data values of a P-DATA-TF PDU whose bytes after the 6-byte PDU
    header are ``body``: (presentation context ID, the value's bytes from its message control
    header on), as pynetdicom's ``P_DATA_TF.decode`` and ``to_primitive`` give them. None
    where pynetdicom's decoder would fail (an item that runs past the end or is shorter than
    its context ID), so that its path reports the invalid PDU."""
    values = []
    offset, end = 0, len(body)
    with memoryview(body) as view:
        while offset < end:
            if end - offset < 5:
                return None
            item_length, context_id = _PDV_HEADER(body, offset)
            if item_length < 1 or offset + 4 + item_length > end:
                return None
            values.append((context_id, bytes(view[offset + 5 : offset + 4 + item_length])))
            offset += 4 + item_length
    return values


_P_DATA_TF_HEAD = struct.Struct(">BBIIB").pack


def p_data_tf_pdu(context_id: int, value: bytes) -> bytes:
    """The P-DATA-TF PDU carrying one presentation data value (``value`` from its message
    control header on), as pynetdicom's ``P_DATA_TF.from_primitive(...).encode()`` writes it for
    a P-DATA primitive holding that one value: the inverse of :func:`p_data_values`."""
    # PDU type 04, reserved, PDU length; the item's length, its presentation context ID
    return _P_DATA_TF_HEAD(0x04, 0, len(value) + 5, len(value) + 1, context_id) + value


def unbind_idle_log_handlers(assoc: Association) -> None:
    """Unbind pynetdicom's standard log handlers from ``assoc`` when pynetdicom's logger drops
    their lines (the node sets it to WARNING): they only log, at INFO and DEBUG, and with that
    off still build every line and copy each data set once to say that it is present."""
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        for event, handler in _STANDARD_LOG_HANDLERS:
            assoc.unbind(event, handler)


class EventAssociation(Association):
    """pynetdicom's acceptor association with an event-driven reactor and :class:`EventDUL`."""

    def __init__(self, ae, mode: str):
        self.created_at = time.monotonic()  # the receiver's accept policy reads it
        self._wake_event = threading.Event()
        self.timed_out_waits = 0  # as EventDUL.timed_out_waits
        self.waits = 0
        super().__init__(ae, mode)
        self.dul = EventDUL(self)
        self.dimse = StoreResponseDIMSE(self)
        self.unbind_idle_log_handlers()
        self.dimse.msg_queue = _WakingQueue(self.wake)
        # pynetdicom's timeout setters write into the DUL's timers: set them on the new DUL.
        self.acse_timeout = self.ae.acse_timeout
        self.network_timeout = self.ae.network_timeout

    def unbind_idle_log_handlers(self) -> None:
        """:func:`unbind_idle_log_handlers` for this association. pynetdicom's server binds
        the handlers again on each new association (``AssociationServer._bind_defaults``), so
        :class:`EventRequestHandler` calls this after the server's handlers too."""
        unbind_idle_log_handlers(self)

    def wake(self) -> None:
        """Make the association reactor look for work now (any thread may call this)."""
        self._wake_event.set()

    _kill = _WakingFlag()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``Association._run_reactor``, with its ``time.sleep(0.001)``
        before every check replaced by a wait for :meth:`wake` (or a timer)."""
        self._is_paused = False
        busy = False
        while not self._kill:
            if not busy and not self._wake_event.wait(
                _timer_wait(self.dul._idle_timer, MAX_IDLE_WAIT_S)
            ):
                self.timed_out_waits += 1
            # Cleared before the checks: a wake during them leaves the event set.
            self._wake_event.clear()
            self.waits += not busy
            busy = False

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)
                busy = True  # another message may be queued behind this one

            if self.is_established and self.acse.is_release_requested():
                # Marked released before the A-RELEASE-RP goes out (pynetdicom marks it after):
                # the peer closes the connection as soon as it has the response, and the DUL
                # thread, no longer a poll behind, may report that close (EVT_CONN_CLOSE) before
                # this thread gets further; handlers then see a released association.
                self.is_released = True
                self.is_established = False
                self.acse.send_release(is_response=True)
                log.info("Association Released")
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                log.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()

                self.kill()
                return


# --- the two hot spots of pynetdicom's C-STORE path --------------------------------------------
#
# Measured with py-spy (--gil) in a node receiving from 4 storescu senders, pynetdicom held the
# interpreter lock for about half of the process's time; two of its steps took 19 % of it (a
# third of pynetdicom's share) and have a cheaper equal: reading a PDU (4 KiB per recv call
# into a growing bytearray) and encoding the C-STORE response's command set (pydicom's writer,
# twice: once for the group length). The code below does those two steps with the same
# result, bytes for bytes.


class WholeReadSocket(AssociationSocket):
    """pynetdicom's association socket, whose ``recv`` reads into one buffer of the size asked
    for, as many bytes per call as the kernel has (pynetdicom's reads at most 4 KiB per call:
    about 100 Python iterations for one CT instance's PDU). Same result: the bytes asked for,
    or fewer when the connection closed first; socket errors and timeouts raise as before."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        with memoryview(buffer) as view:
            read = 0
            while read < nr_bytes:
                got = sock.recv_into(view[read:], nr_bytes - read)
                if not got:  # connection closed: what arrived so far, as pynetdicom returns
                    break
                read += got
        if read < nr_bytes:
            del buffer[read:]
        return buffer


_U16 = struct.Struct("<H").pack
_U32 = struct.Struct("<I").pack
_TEXT_PAD = {"UI": b"\0", "AE": b" ", "CS": b" ", "LO": b" ", "SH": b" ", "ST": b" "}


def encode_command_set(command_set) -> bytes | None:
    """``command_set`` (a pydicom Dataset of group 0000 elements) in Implicit VR Little
    Endian, as pynetdicom's ``encode(command_set, True, True)`` writes it; None when it holds
    a VR or value this encoder does not take (the caller then uses pynetdicom's)."""
    return _encode_elements((elem.tag, elem.VR, elem.value) for elem in command_set)


def _encode_elements(elements) -> bytes | None:
    """(tag, VR, value) triples, in tag order, as :func:`encode_command_set` encodes them."""
    out = []
    try:
        for tag, vr, val in elements:
            if val is None:
                values = []
            elif isinstance(val, str | int):
                values = [val]
            else:  # a multi-valued element
                values = list(val)
            if vr == "US":
                data = b"".join(_U16(v) for v in values)
            elif vr == "UL":
                data = b"".join(_U32(v) for v in values)
            elif vr == "AT":
                data = b"".join(_U16(v >> 16) + _U16(v & 0xFFFF) for v in values)
            elif vr in _TEXT_PAD and all(isinstance(v, str) and v.isascii() for v in values):
                data = "\\".join(values).encode("ascii")
                if len(data) % 2:
                    data += _TEXT_PAD[vr]
            else:
                return None
            out.append(_U16(tag >> 16) + _U16(tag & 0xFFFF) + _U32(len(data)) + data)
    except (struct.error, TypeError, ValueError):
        return None
    return b"".join(out)


def _with_group_length(body: bytes) -> bytes:
    """A command set: its (0000,0000) Command Group Length element (UL, Implicit VR Little
    Endian), then ``body``, the encoded elements it counts."""
    return _U16(0) + _U16(0) + _U32(4) + _U32(len(body)) + body


# The command set of a C-STORE response after the group length, in tag order: (tag, VR, the
# C_STORE primitive's attribute or a fixed value). pynetdicom's C_STORE_RSP.primitive_to_message
# copies each attribute that is not None, sets CommandField and CommandDataSetType (a response
# carries no data set) and drops the rest.
_STORE_RSP_ELEMENTS = (
    (0x00000002, "UI", "AffectedSOPClassUID"),
    (0x00000100, "US", 0x8001),  # CommandField: C-STORE-RSP
    (0x00000120, "US", "MessageIDBeingRespondedTo"),
    (0x00000800, "US", 0x0101),  # CommandDataSetType: no data set
    (0x00000900, "US", "Status"),
    (0x00000901, "AT", "OffendingElement"),
    (0x00000902, "LO", "ErrorComment"),
    (0x00001000, "UI", "AffectedSOPInstanceUID"),
)


def store_response_command_set(primitive: C_STORE) -> bytes | None:
    """The whole encoded command set (group length first) of the C-STORE response
    ``primitive``, as pynetdicom's C_STORE_RSP would encode it, without building that message
    (its command set is a pydicom Dataset: about a twentieth of a receiving process's time
    went into building it); None where :func:`encode_command_set` declines a value."""
    elements = []
    for tag, vr, source in _STORE_RSP_ELEMENTS:
        value = getattr(primitive, source) if isinstance(source, str) else source
        if value is not None:
            elements.append((tag, vr, value))
    body = _encode_elements(elements)
    return None if body is None else _with_group_length(body)


def store_request_command_set(
    sop_class: str, sop_instance: str, message_id: int, priority: int
) -> bytes | None:
    """The whole encoded command set (group length first) of a C-STORE request with a data
    set and no Move Originator, as pynetdicom's C_STORE_RQ encodes it from a C_STORE primitive
    (the sender's side of :func:`store_response_command_set`); None where
    :func:`encode_command_set` declines a value (the caller then uses pynetdicom's)."""
    body = _encode_elements(
        (
            (0x00000002, "UI", sop_class),
            (0x00000100, "US", 0x0001),  # CommandField: C-STORE-RQ
            (0x00000110, "US", message_id),
            (0x00000700, "US", priority),
            (0x00000800, "US", 0x0001),  # CommandDataSetType: a data set follows
            (0x00001000, "UI", sop_instance),
        )
    )
    return None if body is None else _with_group_length(body)


class _GroupLength:
    """``message._set_command_group_length`` with :func:`encode_command_set`. It keeps the
    encoded elements after the group length (``body``) for the send, so that the command set
    is encoded once; None where pynetdicom's encoder had to do it."""

    def __init__(self, message: C_STORE_RSP):
        self.message = message
        self.body: bytes | None = None

    def __call__(self) -> None:
        del self.message.command_set.CommandGroupLength
        self.body = encode_command_set(self.message.command_set)
        if self.body is None:
            C_STORE_RSP._set_command_group_length(self.message)
        else:
            self.message.command_set.CommandGroupLength = len(self.body)


def _encoded_response(
    message: C_STORE_RSP, body: bytes | None, context_id: int, max_pdu_length: int
):
    """``message.encode_msg(context_id, max_pdu_length)``: one P-DATA with the command set
    (its group length element, then ``body``), where it fits one PDU; else pynetdicom's."""
    encoded = None if body is None else _with_group_length(body)
    fits = max_pdu_length == 0 or len(encoded or b"") <= max_pdu_length - 6
    if encoded is None or not fits or (message.data_set and message.data_set.getvalue()):
        yield from message.encode_msg(context_id, max_pdu_length)
        return
    message.context_id = context_id
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
    yield pdata


# The command elements a C-STORE request may carry, as the one-PDV decoder below reads them:
# tag -> (VR, the C_STORE primitive's attribute; None for the elements it has no attribute for).
_STORE_RQ_ELEMENTS = {
    0x00000000: ("UL", None),  # CommandGroupLength
    0x00000002: ("UI", "AffectedSOPClassUID"),
    0x00000100: ("US", None),  # CommandField
    0x00000110: ("US", "MessageID"),
    0x00000700: ("US", "Priority"),
    0x00000800: ("US", None),  # CommandDataSetType
    0x00001000: ("UI", "AffectedSOPInstanceUID"),
    0x00001030: ("AE", "MoveOriginatorApplicationEntityTitle"),
    0x00001031: ("US", "MoveOriginatorMessageID"),
}
_ELEMENT_HEAD = struct.Struct("<HHI").unpack_from
_US = struct.Struct("<H").unpack_from
_UL = struct.Struct("<I").unpack_from


def store_request_fields(encoded: bytes) -> dict[str, object] | None:
    """The C_STORE primitive's attributes from the encoded command set (Implicit VR Little
    Endian) of a C-STORE request with a data set, each value as pydicom's decoding gives it to
    pynetdicom's ``message_to_primitive`` (UIDs without their padding, AE titles stripped,
    numbers); None for anything else (another command, no data set, an element outside
    :data:`_STORE_RQ_ELEMENTS`, a length that does not fit, several values, text that is not
    ASCII), which pynetdicom's own decoding then takes."""
    fields: dict[str, object] = {}
    command = dataset_type = None
    pos, end = 0, len(encoded)
    try:
        while pos < end:
            group, element, length = _ELEMENT_HEAD(encoded, pos)
            pos += 8
            tag = group << 16 | element
            known = _STORE_RQ_ELEMENTS.get(tag)
            if known is None or pos + length > end:
                return None
            vr, keyword = known
            data = encoded[pos : pos + length]
            pos += length
            if vr == "US":
                if length != 2:
                    return None
                value: object = _US(data)[0]
            elif vr == "UL":
                if length != 4:
                    return None
                value = _UL(data)[0]
            else:
                if not data.isascii() or b"\\" in data:
                    return None
                text = data.decode("ascii")
                value = text.rstrip("\0 ").strip() if vr == "UI" else text.strip()
            if tag == 0x00000100:
                command = value
            elif tag == 0x00000800:
                dataset_type = value
            if keyword is not None:
                fields[keyword] = value
    except struct.error:
        return None
    if command != 0x0001 or dataset_type in (None, 0x0101):
        return None
    return fields


class StoreResponseDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, sending C-STORE responses encoded by
    :func:`store_response_command_set` where no EVT_DIMSE_SENT handler wants the message
    object (the node binds none), else with :class:`_GroupLength` and
    :func:`_encoded_response` (the body of pynetdicom 3.0.4's
    ``DIMSEServiceProvider.send_msg`` with those two steps). The message stays pynetdicom's
    own C_STORE_RSP class: its event handlers look messages up by their exact class."""

    def __init__(self, assoc) -> None:
        super().__init__(assoc)
        # A C-STORE request being received by receive_primitive's own path: the primitive,
        # its presentation context, the data set so far.
        # (None, context, None) while the data set of a refused request goes by.
        self._store_request: tuple[C_STORE | None, int, BytesIO | None] | None = None

    def receive_primitive(self, primitive) -> None:
        """pynetdicom's ``receive_primitive``, with C-STORE requests decoded by
        :func:`store_request_fields` where nothing needs pynetdicom's message object (no
        EVT_DIMSE_RECV handler: the node binds none; no chunked data set mode): their command
        set is not decoded into a pydicom Dataset and read back, about a tenth of a
        receiving process's time. The request starts with a P-DATA whose first value is the
        whole command set; every other message, and a command set split over several values,
        goes to pynetdicom's path unchanged."""
        if not isinstance(primitive, P_DATA):
            super().receive_primitive(primitive)
            return
        pdvs = primitive.presentation_data_value_list
        if self._store_request is None:
            if (
                self.message is not None and self.message.encoded_command_set.tell()
            ) or not self._start_store_request(pdvs):
                super().receive_primitive(primitive)
                return
            pdvs = pdvs[1:]
        request, context_id, data_set = self._store_request  # type: ignore[misc]
        for _, data in pdvs:
            if data[0] & 1:
                # A command fragment before the data set's last fragment: the peer broke the
                # protocol (pynetdicom would append it to the command set already decoded).
                self._store_request = (None, context_id, None)  # the rest is dropped
                log.error("Received a command fragment inside a C-STORE data set")
                self.dul.event_queue.put("Evt19")
                return
            if data_set is not None:  # None: a refused request's data, dropped
                data_set.write(data[1:])
            if data[0] & 2:
                self._store_request = None
                if request is not None:
                    request.DataSet = data_set
                    request._context_id = context_id
                    self.msg_queue.put((context_id, request))
                return

    def _start_store_request(self, pdvs) -> bool:
        """Begin a C-STORE request from its first P-DATA values; False to leave it to
        pynetdicom."""
        if not pdvs or pdvs[0][1][0] != 0x03:  # not a whole command set in one value
            return False
        if _config.STORE_RECV_CHUNKED_DATASET or self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            return False
        context_id, data = pdvs[0]
        fields = store_request_fields(data[1:])
        if fields is None:
            return False
        request = C_STORE()
        try:
            for keyword, value in fields.items():  # pynetdicom's setters check each value
                setattr(request, keyword, value)
        except Exception as exc:  # what message_to_primitive does with an invalid value
            log.error("Received an invalid DIMSE message")
            log.exception(exc)
            self.dul.event_queue.put("Evt19")
            self._store_request = (None, context_id, None)  # its data set is dropped
            return True
        self._store_request = (request, context_id, BytesIO())
        return True

    def send_msg(self, primitive, context_id: int) -> None:
        if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
            super().send_msg(primitive, context_id)
            return
        if not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            # No handler wants the message object (the node binds none): the response is
            # encoded straight from the primitive, one P-DATA where it fits one PDU.
            encoded = store_response_command_set(primitive)
            max_pdu = self.maximum_pdu_size
            if encoded is not None and (max_pdu == 0 or len(encoded) <= max_pdu - 6):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
                self.dul.send_pdu(pdata)
                return
        dimse_msg = C_STORE_RSP()
        # An instance attribute, so that primitive_to_message calls it.
        dimse_msg._set_command_group_length = group_length = _GroupLength(dimse_msg)
        dimse_msg.primitive_to_message(primitive)
        dimse_msg.context_id = context_id
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": dimse_msg})
        responses = _encoded_response(
            dimse_msg, group_length.body, context_id, self.maximum_pdu_size
        )
        for pdata in responses:
            self.dul.send_pdu(pdata)


class EventRequestHandler(RequestHandler):
    """pynetdicom's request handler, creating :class:`EventAssociation` acceptors (the body
    of pynetdicom 3.0.4's ``RequestHandler._create_association`` with the class swapped)."""

    def _create_association(self) -> Association:
        assoc = EventAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server

        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"

        sock = WholeReadSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)

        assoc.requestor.address_info = self.remote

        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    assoc.bind(event, handler[0], handler[1])
        assoc.unbind_idle_log_handlers()  # the server's handlers include them again
        return assoc
