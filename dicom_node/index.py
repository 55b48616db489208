"""The instance index: read the header tags grouping and geometry need, and record them.

:func:`read_header` parses only the header of an encoded instance (never the pixel data) and
refuses data that must not be stored, raising :class:`InvalidInstance` with the DIMSE status to
answer. :class:`Indexer` turns a stored file into Study/Series/Instance rows, one committed
transaction per instance, and keeps the audit trail of duplicates, replacements and rejections.

Series bookkeeping promised to later stages: every new or changed instance increments
``Series.revision`` and sets ``last_received``; an instance that arrives or changes after the
series left ``receiving`` (complete, processed, rejected, ignored) sets its state to ``changed``.
An identical resend (same SOP Instance UID and SHA-256) changes nothing but an audit row. The
same SOP Instance UID in another series is refused (:class:`UidConflict`): an indexed instance
never moves to another series. Refusals of instances of a known series are audited so that
completion can read them back (:func:`refusals_for_series`).
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import Connection, Engine, bindparam, case, insert, literal, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from dicom_node.db import AuditEvent, Instance, Series, SeriesState, Study, utcnow
from dicom_node.uids import is_valid_uid

log = logging.getLogger(__name__)

# Status codes we answer with (PS3.4 B.2.3). Cxxx = "cannot understand"; the low byte says why.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900  # data set does not match the SOP class/instance of the command
STATUS_UNDECODABLE = 0xC210  # the header could not be parsed
STATUS_MISSING_UID = 0xC211  # a required UID is absent or empty
STATUS_INVALID_UID = 0xC212  # a UID is not a valid DICOM UID (syntax, length)
# The SOP Instance UID is already indexed in another series. PS3.4 B.2.3 gives C-STORE no status
# for this (0x0111 Duplicate SOP Instance is N-CREATE's); 0xA7xx would invite retries that fail
# the same way, and 0xA9xx says the data set does not fit its SOP class, which it does. Cxxx is
# the failure "the SCP cannot process this data set", which senders do not retry; the low byte
# continues our own C21x family.
STATUS_UID_CONFLICT = 0xC213

REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class InvalidInstance(Exception):
    """The instance must not be stored; ``status`` is the C-STORE status to answer. ``header``
    is set when the header could be read (the refusal then names its series and slice)."""

    def __init__(
        self,
        status: int,
        reason: str,
        sop_instance_uid: str | None = None,
        header: Header | None = None,
    ):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.sop_instance_uid = sop_instance_uid
        self.header = header


class UidConflict(Exception):
    """Raised by :meth:`Indexer.record`: the SOP Instance UID is already indexed in another
    series. Nothing was recorded; the instance already indexed stays as it is."""

    status = STATUS_UID_CONFLICT
    reason = "SOP Instance UID already in another series"  # fits ErrorComment (LO, 64)

    def __init__(self, header: Header, other_series_uid: str, other_instance_number: int | None):
        super().__init__(self.reason)
        self.header = header
        self.other_series_uid = other_series_uid
        self.other_instance_number = other_instance_number


@dataclass(frozen=True)
class Header:
    """What the index keeps of one instance (no patient data)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part: str | None = None
    instance_number: int | None = None
    acquisition_number: int | None = None
    image_position: list[float] | None = None
    image_orientation: list[float] | None = None
    pixel_spacing: list[float] | None = None
    slice_thickness: float | None = None
    rows: int | None = None
    columns: int | None = None
    frame_of_reference_uid: str | None = None
    image_type: list[str] | None = None
    number_of_frames: int | None = None
    images_in_acquisition: int | None = None


# -- header parsing --------------------------------------------------------------------------


def _get(ds: Dataset, keyword: str) -> Any:
    """The value of ``keyword``, or None when absent, empty or not decodable."""
    try:
        elem = ds.get(keyword)
    except Exception:  # a malformed value must not fail the whole instance
        return None
    if elem is None or elem == "":
        return None
    return elem


def _floats(value: Any, n: int) -> list[float] | None:
    if value is None:
        return None
    try:
        vals = [float(v) for v in (value if isinstance(value, list | tuple) else list(value))]
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _str(value: Any, limit: int = 64) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s[:limit] or None


def _functional_group(ds: Dataset, item: str, keyword: str) -> Any:
    """Enhanced multi-frame: ``keyword`` from shared groups, else from the first frame's."""
    for group_seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = _get(ds, group_seq)
        if not groups:
            continue
        inner = _get(groups[0], item)
        if inner:
            value = _get(inner[0], keyword)
            if value is not None:
                return value
    return None


def _uid(ds: Dataset, keyword: str) -> str:
    value = _get(ds, keyword)
    return "" if value is None else str(value).strip("\0 ")


_EXPLICIT_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"}  # fmt: skip
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


class _Truncated(Exception):
    pass


_PIXEL_DATA = 0x7FE00010


def _walk(
    buf: bytes,
    pos: int,
    end: int,
    explicit: bool,
    stop: int | None,
    pixel: list[tuple[int, int]] | None = None,
) -> int:
    """Walk data elements from ``pos``; return the offset after ``stop`` (a delimiter tag) or
    ``end``. Raises :class:`_Truncated` when a length runs past the data. ``pixel`` (top level
    only) receives (value offset, length) of the PixelData element."""
    while pos < end:
        if pos + 8 > end:
            raise _Truncated(f"element header cut off at byte {pos}")
        group, elem = struct.unpack_from("<HH", buf, pos)
        tag = group << 16 | elem
        if group == 0xFFFE:  # item / delimiters have no VR in any transfer syntax
            (length,) = struct.unpack_from("<I", buf, pos + 4)
            pos += 8
            if tag == stop:
                return pos
            if tag != _ITEM:
                raise _Truncated(f"unexpected delimiter ({group:04X},{elem:04X}) at {pos - 8}")
            if length == _UNDEFINED:
                pos = _walk(buf, pos, end, explicit, _ITEM_END)
            else:
                pos += length
            continue
        vr = buf[pos + 4 : pos + 6]
        if explicit and vr in _EXPLICIT_LONG_VRS:
            if pos + 12 > end:
                raise _Truncated(f"element header cut off at byte {pos}")
            (length,) = struct.unpack_from("<I", buf, pos + 8)
            pos += 12
        elif explicit:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            pos += 8
        else:
            (length,) = struct.unpack_from("<I", buf, pos + 4)
            pos += 8
        if tag == _PIXEL_DATA and pixel is not None:
            pixel.append((pos, length))
        if length == _UNDEFINED:  # a sequence, or encapsulated pixel data: items follow
            pos = _walk(buf, pos, end, explicit, _SEQ_END)
        else:
            pos += length
    if stop is not None or pos > end:
        raise _Truncated("data set ends inside an element or sequence")
    return pos


@dataclass(frozen=True)
class PixelDataExtent:
    """What the bytes say of a PixelData value, without decoding it. ``length`` is a native
    value's byte count; encapsulated data count ``fragments``, the non-empty items after the
    basic offset table."""

    length: int
    encapsulated: bool
    fragments: int = 0


@dataclass(frozen=True)
class EncodingScan:
    """The result of :func:`scan_encoding`. ``checked`` is False for the transfer syntaxes not
    walked (big endian, deflated); then ``pixel_data`` says nothing. Otherwise ``pixel_data`` is
    None when the data set has no top-level PixelData."""

    problem: str | None
    checked: bool
    pixel_data: PixelDataExtent | None = None


def _fragments(buf: bytes, pos: int, end: int) -> int:
    """Non-empty items after the basic offset table of encapsulated pixel data at ``pos``."""
    count, first = 0, True
    while pos + 8 <= end:
        tag, length = struct.unpack_from("<II", buf, pos)
        tag = (tag & 0xFFFF) << 16 | tag >> 16  # stored as group, element
        pos += 8
        if tag != _ITEM or length == _UNDEFINED:
            break
        count += 0 if first or length == 0 else 1
        first = False
        pos += length
    return count


def scan_encoding(dataset: bytes, transfer_syntax: str) -> EncodingScan:
    """Check that every element of ``dataset`` (pixel data included) fits in the bytes sent,
    and find the extent of its PixelData on the way.

    Catches truncated or garbled encodings that a header-only parse would accept. Only for the
    little-endian, non-deflated transfer syntaxes (every common one).
    """
    if transfer_syntax in ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
                           "1.2.840.10008.1.2.4.95"):  # fmt: skip
        return EncodingScan(None, checked=False)  # big endian / deflated: pydicom's parse is it
    explicit = transfer_syntax != "1.2.840.10008.1.2"
    pixel: list[tuple[int, int]] = []
    try:
        _walk(dataset, 0, len(dataset), explicit, None, pixel)
    except (_Truncated, struct.error) as exc:
        return EncodingScan(str(exc) or "malformed encoding", checked=True)
    if not pixel:
        return EncodingScan(None, checked=True)
    pos, length = pixel[-1]
    if length == _UNDEFINED:
        extent = PixelDataExtent(0, True, _fragments(dataset, pos, len(dataset)))
    else:
        extent = PixelDataExtent(length, False)
    return EncodingScan(None, checked=True, pixel_data=extent)


def check_encoding(dataset: bytes, transfer_syntax: str) -> str | None:
    """:func:`scan_encoding`'s verdict on the encoding alone: None when fine or not checkable,
    else a reason."""
    return scan_encoding(dataset, transfer_syntax).problem


_BITS_ALLOCATED = (1, 8, 16, 32, 64)


def pixel_problem(
    ds: Dataset, extent: PixelDataExtent | None, *, check_pixel_data: bool = True
) -> str | None:
    """Why the Image Pixel description of ``ds`` cannot make an image, or None: a reason a
    person reads that names the value and fits an Error Comment (64 characters).

    Cheap checks only, nothing decoded: Rows and Columns present and positive, BitsAllocated 1
    or a whole number of bytes up to 64, SamplesPerPixel and NumberOfFrames (where given)
    positive; and with ``check_pixel_data``, PixelData present (``extent`` not None), not empty,
    and for native (uncompressed) data at least Rows x Columns x SamplesPerPixel x frames x
    BitsAllocated / 8 bytes long. Whether compressed data decode is left to the job.
    """
    dims: dict[str, int] = {}
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        raw = _get(ds, keyword)
        value = _int(raw)
        if value is None:
            return (
                f"{keyword} is absent" if raw is None else f"{keyword} {raw!s:.20} is not a number"
            )
        if value <= 0:
            return f"{keyword} is {value}; must be positive"
        dims[keyword] = value
    if dims["BitsAllocated"] not in _BITS_ALLOCATED:
        return f"BitsAllocated {dims['BitsAllocated']} is not 1, 8, 16, 32 or 64"
    for keyword in ("SamplesPerPixel", "NumberOfFrames"):
        value = _int(_get(ds, keyword))
        if value is not None and value <= 0:
            return f"{keyword} is {value}; must be positive"
        dims[keyword] = value or 1
    if not check_pixel_data:
        return None
    if extent is None:
        return "PixelData is absent"
    if extent.encapsulated:
        return None if extent.fragments else "PixelData (compressed) holds no fragment"
    pixels = dims["Rows"] * dims["Columns"] * dims["SamplesPerPixel"] * dims["NumberOfFrames"]
    needed = (pixels * dims["BitsAllocated"] + 7) // 8
    if extent.length == 0:
        return "PixelData is empty"
    if extent.length < needed:
        return f"PixelData is {extent.length} bytes; the image needs {needed}"
    return None


def read_header(
    data: bytes,
    command_sop_class: str | None = None,
    command_sop_instance: str | None = None,
    dataset_offset: int | None = None,
) -> Header:
    """Parse the header of a Part 10 byte string (preamble + file meta + data set).

    Raises :class:`InvalidInstance` when the data cannot be parsed (0xC210), a required UID is
    missing (0xC211) or invalid (0xC212), or the data set's SOP Class/Instance UID differs from
    the C-STORE command's (0xA900), or its Image Pixel description cannot make an image
    (0xA900, :func:`pixel_problem`). With ``dataset_offset`` (where the data set starts in
    ``data``) the whole data set's encoding is checked too (:func:`scan_encoding`), and so is
    the PixelData's length.
    """
    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
        uids = {k: _uid(ds, k) for k in REQUIRED_UIDS}
        ts = str(ds.file_meta.TransferSyntaxUID)
    except Exception as exc:
        raise InvalidInstance(
            STATUS_UNDECODABLE,
            f"cannot decode data set header: {type(exc).__name__}",
            command_sop_instance,
        ) from None
    scan = None
    if dataset_offset is not None:
        scan = scan_encoding(data[dataset_offset:], ts)
        if scan.problem:
            raise InvalidInstance(
                STATUS_UNDECODABLE, f"cannot decode data set: {scan.problem}", command_sop_instance
            )

    missing = [k for k, v in uids.items() if not v]
    if missing:
        raise InvalidInstance(
            STATUS_MISSING_UID, f"missing or empty {', '.join(missing)}", command_sop_instance
        )
    invalid = [k for k, v in uids.items() if not is_valid_uid(v)]
    if invalid:
        raise InvalidInstance(
            STATUS_INVALID_UID,
            "not a valid DICOM UID: " + ", ".join(f"{k}={uids[k]!r:.72}" for k in invalid),
            command_sop_instance,
        )
    if command_sop_class and uids["SOPClassUID"] != command_sop_class:
        raise InvalidInstance(
            STATUS_DATASET_MISMATCH,
            f"SOPClassUID {uids['SOPClassUID']} differs from the command's {command_sop_class}",
            command_sop_instance,
        )
    if command_sop_instance and uids["SOPInstanceUID"] != command_sop_instance:
        raise InvalidInstance(
            STATUS_DATASET_MISMATCH,
            f"SOPInstanceUID {uids['SOPInstanceUID']} differs from the command's "
            f"{command_sop_instance}",
            command_sop_instance,
        )

    ipp = _get(ds, "ImagePositionPatient")
    iop = _get(ds, "ImageOrientationPatient")
    spacing = _get(ds, "PixelSpacing")
    thickness = _get(ds, "SliceThickness")
    if "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds:
        ipp = ipp or _functional_group(ds, "PlanePositionSequence", "ImagePositionPatient")
        iop = iop or _functional_group(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = spacing or _functional_group(ds, "PixelMeasuresSequence", "PixelSpacing")
        thickness = thickness or _functional_group(ds, "PixelMeasuresSequence", "SliceThickness")
    image_type = _get(ds, "ImageType")
    if image_type is not None:
        is_str = isinstance(image_type, str)
        image_type = [str(image_type)] if is_str else [str(v) for v in image_type]
    frame_uid = _uid(ds, "FrameOfReferenceUID")

    header = Header(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=ts,
        modality=_str(_get(ds, "Modality"), 16),
        series_number=_int(_get(ds, "SeriesNumber")),
        series_description=_str(_get(ds, "SeriesDescription")),
        body_part=_str(_get(ds, "BodyPartExamined")),
        instance_number=_int(_get(ds, "InstanceNumber")),
        acquisition_number=_int(_get(ds, "AcquisitionNumber")),
        image_position=_floats(ipp, 3),
        image_orientation=_floats(iop, 6),
        pixel_spacing=_floats(spacing, 2),
        slice_thickness=_float(thickness),
        rows=_int(_get(ds, "Rows")),
        columns=_int(_get(ds, "Columns")),
        frame_of_reference_uid=frame_uid[:64] or None,
        image_type=image_type,
        number_of_frames=_int(_get(ds, "NumberOfFrames")),
        images_in_acquisition=_int(_get(ds, "ImagesInAcquisition")),
    )
    # An instance that cannot make an image would be acknowledged and fail at job time; it is
    # refused now, with the header, so that its series can name it (complete.py).
    problem = pixel_problem(
        ds,
        scan.pixel_data if scan is not None else None,
        check_pixel_data=scan is not None and scan.checked,
    )
    if problem:
        raise InvalidInstance(STATUS_DATASET_MISMATCH, problem, command_sop_instance, header)
    return header


# -- recording ---------------------------------------------------------------------------------


_INSERT_STUDY = insert(Study)
_INSERT_SERIES = insert(Series)
_INSERT_INSTANCE = insert(Instance)
_INSERT_AUDIT = insert(AuditEvent)
_SELECT_STUDY = select(Study.id).where(Study.study_uid == bindparam("uid"))
_SELECT_SERIES = select(Series.id).where(Series.series_uid == bindparam("uid"))
_SELECT_INSTANCE = select(Instance.id, Instance.sha256, Instance.series_id).where(
    Instance.sop_instance_uid == bindparam("uid")
)
_SELECT_OWNER = (
    select(Series.series_uid, Instance.instance_number)
    .join(Series, Series.id == Instance.series_id)
    .where(Instance.id == bindparam("instance_id"))
)
_UPDATE_INSTANCE = update(Instance).where(Instance.id == bindparam("instance_id"))
_OPEN_STATES = (SeriesState.receiving.value, SeriesState.changed.value)
# Every new or changed instance: revision + 1, last_received = now, and a series that had left
# "receiving" becomes "changed". A hold set by an aborted association or a restart ends: the
# sender is back, and the quiet period (and a new hold, should this association abort) decides.
_TOUCH_SERIES = (
    update(Series)
    .where(Series.id == bindparam("series_id"))
    .values(
        revision=Series.revision + 1,
        last_received=bindparam("now"),
        hold_until=None,
        state=case(
            (Series.state.in_(_OPEN_STATES), Series.state),
            else_=literal(SeriesState.changed.value),
        ),
    )
)


class _StaleCache(Exception):
    """Internal: retry the transaction without the cached series id."""


class Indexer:
    """Records instances and rejections; every public method commits its own transaction.

    This runs once per received instance, inside the acknowledgement's latency, so it uses
    pre-built Core statements on a plain connection rather than ORM objects. Writes from the
    receiver's threads are serialised by a lock (SQLite has one writer anyway, and waiting on a
    lock is cheaper than SQLite's busy-sleep); a transient "database is locked" from another
    process, or a unique-key race, is retried.

    ``time_budget_s`` bounds each write: waiting for the lock, SQLite's busy wait (its busy
    timeout is set to what is left) and the retries together. The receiver sets it, because a
    peer waits for the answer: a database held by another process then gives a prompt failure
    (0xA700) instead of a sender that times out. After a write ran out of time, an audit event
    gets one attempt without waiting, so that a failed store does not wait twice.
    """

    RETRIES = 5

    def __init__(self, session_factory: Callable[[], Session], time_budget_s: float | None = None):
        bind = getattr(session_factory, "kw", {}).get("bind")
        if bind is None:
            with session_factory() as s:
                bind = s.get_bind()
        self.engine: Engine = bind
        self.time_budget_s = time_budget_s
        self._lock = threading.Lock()
        self._series_ids: dict[str, int] = {}  # series UID -> row id, filled on commit
        self._out_of_time_at = -1e9  # monotonic time a write last ran out of its budget

    def _retrying(self, fn: Callable[[Connection], str], budget_s: float | None = None) -> str:
        budget_s = self.time_budget_s if budget_s is None else budget_s
        deadline = None if budget_s is None else time.monotonic() + budget_s
        delay = 0.01
        for attempt in range(self.RETRIES):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._lock.acquire(timeout=-1 if left is None else left):
                self._out_of_time_at = time.monotonic()
                raise OperationalError("index write", None, TimeoutError("index writes queued"))
            try:
                with self.engine.connect() as conn:
                    try:
                        if deadline is not None and self.engine.dialect.name == "sqlite":
                            ms = max(0, int((deadline - time.monotonic()) * 1000))
                            conn.exec_driver_sql(f"PRAGMA busy_timeout = {ms}")
                        result = fn(conn)
                        conn.commit()
                        return result
                    except Exception as exc:
                        conn.rollback()
                        self._series_ids.clear()  # may hold ids from the failed transaction
                        retryable = isinstance(exc, IntegrityError | OperationalError | _StaleCache)
                        late = deadline is not None and time.monotonic() + delay >= deadline
                        if late and isinstance(exc, OperationalError):
                            self._out_of_time_at = time.monotonic()
                        if not retryable or attempt == self.RETRIES - 1 or late:
                            raise
                        log.warning("index write retry %d: %s", attempt + 1, type(exc).__name__)
            finally:
                self._lock.release()
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _series_id(self, conn: Connection, h: Header, calling_ae: str | None, now) -> int:
        """The series row id, creating study and series rows on first sight."""
        sid = self._series_ids.get(h.series_uid)
        if sid is not None:
            return sid
        sid = conn.execute(_SELECT_SERIES, {"uid": h.series_uid}).scalar()
        if sid is None:
            study_id = conn.execute(_SELECT_STUDY, {"uid": h.study_uid}).scalar()
            if study_id is None:
                study_id = conn.execute(
                    _INSERT_STUDY, {"study_uid": h.study_uid, "first_received": now}
                ).inserted_primary_key[0]
            sid = conn.execute(
                _INSERT_SERIES,
                {
                    "series_uid": h.series_uid,
                    "study_id": study_id,
                    "modality": h.modality,
                    "series_number": h.series_number,
                    "series_description": h.series_description,
                    "body_part": h.body_part,
                    "calling_ae": calling_ae,
                    "state": SeriesState.receiving,
                    "first_received": now,
                    "last_received": now,
                    "revision": 0,
                },
            ).inserted_primary_key[0]
        return sid

    def record(
        self,
        h: Header,
        file_path: str,
        file_size: int,
        sha256: str,
        calling_ae: str | None,
        peer: str | None = None,
    ) -> str:
        """Index a stored instance. Returns ``"new"``, ``"replaced"`` or ``"duplicate"``.

        ``"duplicate"`` (same SOP Instance UID and SHA-256 as indexed) changes nothing but an
        audit row; ``"replaced"`` (same SOP Instance UID and series, other content) updates the
        row and counts as a change of its series. Raises :class:`UidConflict`, recording
        nothing, when the SOP Instance UID is indexed in another series.
        """

        def tx(conn: Connection) -> str:
            now = utcnow()
            series_id = self._series_id(conn, h, calling_ae, now)
            prev = conn.execute(_SELECT_INSTANCE, {"uid": h.sop_instance_uid}).first()
            event = {
                "series_uid": h.series_uid,
                "sop_instance_uid": h.sop_instance_uid,
                "calling_ae": calling_ae,
                "peer": peer,
                "status": STATUS_SUCCESS,
            }
            if prev is not None and prev.series_id != series_id:
                # The same SOP instance in another series is a sender error or a UID collision.
                # Moving the row would silently take an acknowledged slice from its series, so
                # the newcomer is refused and the indexed one stays (the caller audits both).
                owner = conn.execute(_SELECT_OWNER, {"instance_id": prev.id}).one()
                raise UidConflict(h, owner.series_uid, owner.instance_number)
            if prev is not None and prev.sha256 == sha256:
                _audit(conn, "duplicate", now, **event)
                return "duplicate"
            values = {
                "series_id": series_id,
                "sop_class_uid": h.sop_class_uid,
                "instance_number": h.instance_number,
                "acquisition_number": h.acquisition_number,
                "image_position": h.image_position,
                "image_orientation": h.image_orientation,
                "pixel_spacing": h.pixel_spacing,
                "slice_thickness": h.slice_thickness,
                "rows": h.rows,
                "columns": h.columns,
                "frame_of_reference_uid": h.frame_of_reference_uid,
                "image_type": h.image_type,
                "number_of_frames": h.number_of_frames,
                "images_in_acquisition": h.images_in_acquisition,
                "transfer_syntax_uid": h.transfer_syntax_uid,
                "file_path": file_path,
                "file_size": file_size,
                "sha256": sha256,
                "calling_ae": calling_ae,
                "received_at": now,
            }
            if prev is None:
                conn.execute(_INSERT_INSTANCE, {"sop_instance_uid": h.sop_instance_uid, **values})
            else:
                conn.execute(_UPDATE_INSTANCE, {"instance_id": prev.id, **values})
            if conn.execute(_TOUCH_SERIES, {"series_id": series_id, "now": now}).rowcount != 1:
                raise _StaleCache()  # a cached series id vanished (series removed)
            self._series_ids[h.series_uid] = series_id
            if prev is not None:
                _audit(conn, "replaced", now, **event)
                return "replaced"
            return "new"

        return self._retrying(tx)

    def record_event(self, kind: str, **fields: object) -> None:
        """Audit a rejection, duplicate or failure; never raises (the caller is answering a
        peer, and the database may be what failed)."""
        budget = self.time_budget_s
        if budget is not None and time.monotonic() - self._out_of_time_at < budget:
            budget = 0.0  # the database just made a write wait its whole budget
        try:
            self._retrying(lambda conn: _audit(conn, kind, utcnow(), **fields) or kind, budget)
        except Exception as exc:
            log.error("cannot write audit event %s: %s", kind, type(exc).__name__)

    def record_refusal(
        self,
        status: int,
        reason: str,
        sop_instance_uid: str,
        calling_ae: str | None,
        peer: str | None,
        header: Header | None = None,
    ) -> None:
        """Audit an instance refused at receive (``instance_rejected``). With its ``header``, the
        event names its series and slice (a :data:`REFUSAL_KINDS` event that completion reads).
        Never raises."""
        self.record_event(
            "instance_rejected",
            series_uid=header.series_uid if header is not None else None,
            sop_instance_uid=sop_instance_uid[:64],
            calling_ae=calling_ae,
            peer=peer,
            status=status,
            detail=refusal_detail(header, reason) if header is not None else reason,
        )

    def record_uid_conflict(
        self, exc: UidConflict, calling_ae: str | None, peer: str | None = None
    ) -> None:
        """Audit a refused UID conflict on both series, in one transaction: the refused copy's
        series (a :data:`REFUSAL_KINDS` event that completion reads) and the series that keeps
        the indexed instance (so that ``series show`` of either tells). Never raises."""
        h = exc.header
        other = (
            f"instance #{exc.other_instance_number}"
            if exc.other_instance_number is not None
            else "an instance"
        )
        common = {
            "sop_instance_uid": h.sop_instance_uid,
            "calling_ae": calling_ae,
            "peer": peer,
            "status": exc.status,
        }
        refused = refusal_detail(
            h,
            f"its SOP Instance UID already belongs to {other} of series {exc.other_series_uid}",
            other_series_uid=exc.other_series_uid,
        )
        kept = {
            "reason": f"{other} of this series was sent again in series {h.series_uid}; that "
            f"copy was refused (0x{exc.status:04X}), this one is kept",
            "instance_number": exc.other_instance_number,
            "other_series_uid": h.series_uid,
        }

        def tx(conn: Connection) -> str:
            now = utcnow()
            _audit(conn, "uid_conflict_refused", now, series_uid=h.series_uid, detail=refused,
                   **common)  # fmt: skip
            _audit(conn, "uid_conflict_kept", now, series_uid=exc.other_series_uid, detail=kept,
                   **common)  # fmt: skip
            return "audited"

        try:
            self._retrying(tx)
        except Exception as err:
            log.error("cannot write audit events uid_conflict: %s", type(err).__name__)


# -- refusals ----------------------------------------------------------------------------------

# Audit kinds of an instance of a known series that the receiver refused: completion holds the
# series back while one is outstanding (see complete.outstanding_refusals).
REFUSAL_KINDS = ("uid_conflict_refused", "instance_rejected")


@dataclass(frozen=True)
class Refusal:
    """An instance the receiver refused, as its audit event records it (no patient data)."""

    sop_instance_uid: str
    instance_number: int | None
    position: tuple[float, ...] | None
    status: int | None
    reason: str
    at: datetime

    @property
    def label(self) -> str:
        """The slice as a person finds it: instance number (else UID tail) and position."""
        name = (
            f"instance #{self.instance_number}"
            if self.instance_number is not None
            else f"instance …{self.sop_instance_uid[-12:]}"
        )
        if self.position is not None:
            name += " at (" + ", ".join(f"{v:.1f}" for v in self.position) + ") mm"
        return name


def refusal_detail(h: Header, reason: str, **extra: object) -> dict[str, object]:
    """The audit detail of a refused instance, as :func:`refusals_for_series` reads it back."""
    return {
        "reason": reason,
        "instance_number": h.instance_number,
        "position": h.image_position,
        **extra,
    }


def refusals_for_series(session: Session, series_uid: str) -> list[Refusal]:
    """Every refusal audited for ``series_uid``, oldest first."""
    events = session.scalars(
        select(AuditEvent)
        .where(AuditEvent.series_uid == series_uid, AuditEvent.kind.in_(REFUSAL_KINDS))
        .order_by(AuditEvent.at, AuditEvent.id)
    ).all()
    out = []
    for e in events:
        try:
            detail = json.loads(e.detail or "")
        except ValueError:
            detail = None
        if not isinstance(detail, dict):  # older events kept the reason as plain text
            detail = {"reason": e.detail or ""}
        position = detail.get("position")
        out.append(
            Refusal(
                sop_instance_uid=e.sop_instance_uid or "",
                instance_number=_int(detail.get("instance_number")),
                position=tuple(position) if isinstance(position, list) else None,
                status=e.status,
                reason=str(detail.get("reason") or ""),
                at=e.at,
            )
        )
    return out


def _audit(conn: Connection, kind: str, now, **fields: object) -> None:
    detail = fields.pop("detail", None)
    if detail is not None and not isinstance(detail, str):
        detail = json.dumps(detail, default=str)
    conn.execute(_INSERT_AUDIT, {"kind": kind, "at": now, "detail": detail, **fields})
