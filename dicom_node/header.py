"""The header reader: parse the header of an encoded instance, never its pixel data, and refuse
data that must not be stored.

:func:`read_header` returns a :class:`Header` (what the index keeps of one instance: its UIDs,
its series' description and its first image plane, a :class:`~dicom_node.slices.SliceRef`), or
raises :class:`InvalidInstance` with the DIMSE status to answer. :func:`scan_encoding` walks the
bytes of a data set to catch truncated or garbled encodings a header-only parse would accept;
:func:`pixel_problem` makes the cheap Image Pixel checks. The receiver calls these inside the
acknowledgement's latency, so nothing here decodes pixels.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian
from pydicom.valuerep import VR
from pynetdicom.dsutils import encode_file_meta

from dicom_node.slices import SliceRef, as_int, as_text, as_uid, instance_plane, value
from dicom_node.uids import is_valid_uid

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


@dataclass(frozen=True)
class Header:
    """What the index keeps of one instance (no patient data): its identity, its series'
    description, and ``plane``, the instance as one image plane (for an Enhanced instance, with
    its first frame's geometry; :func:`dicom_node.slices.instance_plane`)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    plane: SliceRef
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part: str | None = None
    number_of_frames: int | None = None


_EXPLICIT_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"}  # fmt: skip
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# An element's first 8 bytes: tag (as one little-endian word: element << 16 | group), the
# explicit VR and its 2-byte length (for implicit VR those 4 bytes are the length).
_ELEMENT_HEADER = struct.Struct("<I2sH").unpack_from
_U32 = struct.Struct("<I").unpack_from


class _Truncated(Exception):
    pass


class _Irregular(Exception):
    """An encoding that the one-pass reader leaves to pydicom's reader."""


_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # pixel, double, float pixel data
_KNOWN_VRS = frozenset(vr.encode() for vr in VR)  # the VRs pydicom reads without guessing
# Shared / Per-Frame Functional Groups: an Enhanced instance's geometry is in these sequences.
_FUNCTIONAL_GROUPS = frozenset({0x52009229, 0x52009230})
# Every attribute the checks and the Header read (_checked_header, instance_plane,
# pixel_problem), and the character set their text is decoded with. The one-pass reader hands
# pydicom only these; tests/test_receive_inprocess.py compares its Headers with the full parse.
_WANTED_KEYWORDS = (
    "SpecificCharacterSet", *REQUIRED_UIDS, "Modality", "SeriesNumber", "SeriesDescription",
    "BodyPartExamined", "NumberOfFrames", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "SliceThickness", "AcquisitionNumber", "ImageType", "ImagesInAcquisition",
    "Rows", "Columns", "FrameOfReferenceUID", "InstanceNumber", "BitsAllocated",
    "SamplesPerPixel",
)  # fmt: skip
_WANTED_TAG: dict[str, int] = {k: tag_for_keyword(k) for k in _WANTED_KEYWORDS}  # type: ignore[misc]
_WANTED = frozenset(_WANTED_TAG.values())


def _walk(
    buf: bytes,
    pos: int,
    end: int,
    explicit: bool,
    stop: int | None,
    pixel: list[tuple[int, int]] | None = None,
    collect: dict[int, tuple[str | None, int, int]] | None = None,
) -> int:
    """Walk data elements from ``pos``; return the offset after ``stop`` (a delimiter tag) or
    ``end``. Raises :class:`_Truncated` when a length runs past the data. ``pixel`` (top level
    only) receives (value offset, length) of the PixelData element.

    With ``collect`` (the one-pass reader, :func:`_read_wanted`) the walk is strict: it raises
    :class:`_Irregular` for every encoding that pydicom's reader treats with a heuristic (an
    unknown VR, UN of undefined length, elements outside items, stray delimiters, an
    Enhanced instance's functional groups), and fills ``collect`` (top level, before the pixel
    data) with (VR, value offset, length) of the tags in :data:`_WANTED`."""
    strict = collect is not None
    wanted = collect is not None and stop is None  # this level is the top level
    while pos < end:
        if pos + 8 > end:
            raise _Truncated(f"element header cut off at byte {pos}")
        tag, vr, short = _ELEMENT_HEADER(buf, pos)
        tag = (tag & 0xFFFF) << 16 | tag >> 16  # stored as group, element
        if tag >> 16 == 0xFFFE:  # item / delimiters have no VR in any transfer syntax
            (length,) = _U32(buf, pos + 4)
            pos += 8
            if tag == stop:
                return pos
            if tag != _ITEM:
                raise _Truncated(
                    f"unexpected delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X}) at {pos - 8}"
                )
            if strict and stop != _SEQ_END:
                raise _Irregular
            if length == _UNDEFINED:
                pos = _walk(buf, pos, end, explicit, _ITEM_END, None, {} if strict else None)
            else:
                pos += length
            continue
        if strict and stop == _SEQ_END:
            raise _Irregular  # an element where a sequence's items should be
        if not explicit:
            (length,) = _U32(buf, pos + 4)
            pos += 8
        elif vr in _EXPLICIT_LONG_VRS:
            if pos + 12 > end:
                raise _Truncated(f"element header cut off at byte {pos}")
            (length,) = _U32(buf, pos + 8)
            pos += 12
        else:
            if strict and vr not in _KNOWN_VRS:
                raise _Irregular
            length = short
            pos += 8
        if tag in _PIXEL_TAGS:
            if pixel is not None and tag == _PIXEL_DATA:
                pixel.append((pos, length))
            wanted = False  # pydicom's header parse stops at the first pixel element
        elif wanted and tag in _WANTED:
            if length == _UNDEFINED:
                raise _Irregular
            collect[tag] = (vr.decode() if explicit else None, pos, length)  # type: ignore[index]
        elif strict and tag in _FUNCTIONAL_GROUPS:
            raise _Irregular  # an Enhanced instance: its geometry is in the sequences
        if length == _UNDEFINED:  # a sequence, or encapsulated pixel data: items follow
            if strict and explicit and vr == b"UN":
                raise _Irregular  # pydicom reads it as an implicit VR sequence
            pos = _walk(buf, pos, end, explicit, _SEQ_END, None, {} if strict else None)
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


_DEFLATED = "1.2.840.10008.1.2.1.99"
# Walked by neither the encoding scan nor the one-pass reader: big endian, deflated and JPIP
# deflated data sets (pydicom's parse inflates or byte-swaps them).
_NOT_WALKED = (ExplicitVRBigEndian, _DEFLATED, "1.2.840.10008.1.2.4.95")


def _scanned(dataset: bytes, pixel: list[tuple[int, int]]) -> EncodingScan:
    """The scan of a data set whose walk passed, found its PixelData at ``pixel``."""
    if not pixel:
        return EncodingScan(None, checked=True)
    pos, length = pixel[-1]
    if length == _UNDEFINED:
        extent = PixelDataExtent(0, True, _fragments(dataset, pos, len(dataset)))
    else:
        extent = PixelDataExtent(length, False)
    return EncodingScan(None, checked=True, pixel_data=extent)


def scan_encoding(dataset: bytes, transfer_syntax: str) -> EncodingScan:
    """Check that every element of ``dataset`` (pixel data included) fits in the bytes sent,
    and find the extent of its PixelData on the way.

    Catches truncated or garbled encodings that a header-only parse would accept. Only for the
    little-endian, non-deflated transfer syntaxes (every common one).
    """
    if transfer_syntax in _NOT_WALKED:
        return EncodingScan(None, checked=False)  # big endian / deflated: pydicom's parse is it
    explicit = transfer_syntax != "1.2.840.10008.1.2"
    pixel: list[tuple[int, int]] = []
    try:
        _walk(dataset, 0, len(dataset), explicit, None, pixel)
    except (_Truncated, struct.error) as exc:
        return EncodingScan(str(exc) or "malformed encoding", checked=True)
    return _scanned(dataset, pixel)


_WANTED_VR: dict[int, str] = {tag: dictionary_VR(tag) for tag in _WANTED}
# One value of a DS or IS as the one-pass reader converts it itself (spaces around it only);
# anything else (empty values, NaN, commas, other padding, longer IS) goes to pydicom.
_PLAIN_DS = re.compile(r" *[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)? *\Z")
_PLAIN_IS = re.compile(r" *[+-]?\d{1,11} *\Z")
_NOT_PLAIN = object()


def _plain_value(vr: str, data: bytes) -> Any:
    """pydicom's value for ``data`` of the wanted attributes' common VRs, without pydicom's
    conversion machinery (hooks, value classes: about 20 us a value, two thirds of the
    one-pass reader's time): the same number, text or list that its conversion gives, as
    the header's readers (:mod:`dicom_node.slices`) see it. :data:`_NOT_PLAIN` for every value
    that is not plainly encoded (non-ASCII or escape bytes, empty, irregular numbers, several
    UIDs or texts), which pydicom then converts. Follows pydicom 3.0's ``convert_numbers``,
    ``convert_DS_string``, ``convert_IS_string``, ``convert_UI``, ``convert_string`` and
    ``convert_text``; tests/test_receive_inprocess.py compares the two."""
    if vr == "US":
        return int.from_bytes(data, "little") if len(data) == 2 else _NOT_PLAIN
    if not data or not data.isascii() or b"\x1b" in data:
        return _NOT_PLAIN
    text = data.decode("ascii")
    if vr == "DS" or vr == "IS":
        items = (text.strip() if vr == "DS" else text).rstrip(" \x00").split("\\")
        plain, number = (_PLAIN_DS, float) if vr == "DS" else (_PLAIN_IS, int)
        for item in items:
            if plain.match(item) is None:
                return _NOT_PLAIN
        return number(items[0]) if len(items) == 1 else [number(item) for item in items]
    if vr == "CS":
        items = text.rstrip(" \x00").split("\\")
        return items[0] if len(items) == 1 else MultiValue(str, items)
    if "\\" in text:
        return _NOT_PLAIN
    if vr == "UI":
        return text.rstrip("\x00 ").strip()
    if vr == "LO":  # the only text VR among the wanted attributes besides CS and UI
        return text.rstrip("\x00 ")
    return _NOT_PLAIN


class _RawAttributes:
    """The wanted attributes (:data:`_WANTED`) of a data set, read by :func:`_read_wanted`, for
    :func:`dicom_node.slices.value`: ``get(keyword)`` gives what a pydicom Dataset's ``get``
    gives (plain values converted by :func:`_plain_value`, the others by pydicom's own
    conversion, text in the data set's Specific Character Set), without building a Dataset (its
    attribute lookups cost as much as the conversions). None of the wanted tags has an
    ambiguous VR, the one case where pydicom's conversion looks at other elements of the data
    set (tests/test_receive_inprocess.py)."""

    def __init__(self, raw: dict[int, RawDataElement]):
        self._raw = raw
        self._values: dict[str, Any] = {}  # converted once, as a Dataset keeps them
        self._encoding: str | list[str] = default_encoding
        charset = raw.get(0x00080005)
        if charset is not None:
            self._encoding = convert_encodings(
                convert_raw_data_element(charset, encoding=default_encoding).value
            )

    def get(self, keyword: str, default: Any = None) -> Any:
        if keyword in self._values:
            return self._values[keyword]
        tag = _WANTED_TAG.get(keyword, -1)
        raw = self._raw.get(tag)
        if raw is None:
            return default
        vr = _WANTED_VR[tag]
        found = _NOT_PLAIN
        if raw.VR is None or vr == raw.VR:  # implicit VR, or the dictionary's
            found = _plain_value(vr, raw.value)
        if found is _NOT_PLAIN:
            found = convert_raw_data_element(raw, encoding=self._encoding).value
        self._values[keyword] = found
        return found


def _read_wanted(
    dataset: bytes, transfer_syntax: str
) -> tuple[_RawAttributes, EncodingScan] | None:
    """The one-pass reader: the data set's wanted attributes (:data:`_WANTED`), raw, and its
    encoding scan, from one walk over its bytes; None when the data set is not a regular one
    (see :func:`_walk`), truncated or garbled, or in a transfer syntax that is not walked. Then
    the caller parses it with pydicom's reader as before.

    On a regular data set this gives what pydicom's reader and :func:`scan_encoding` give,
    for about a fifth of their CPU time: pydicom builds a raw element for every element of
    the header (about 130 for a CT slice), and the scan walks them again. The values stay
    pydicom's raw elements, converted by pydicom when read, with the same character set; a
    keyword outside :data:`_WANTED` reads as absent."""
    if transfer_syntax in _NOT_WALKED:
        return None
    implicit = transfer_syntax == ImplicitVRLittleEndian
    pixel: list[tuple[int, int]] = []
    found: dict[int, tuple[str | None, int, int]] = {}
    try:
        _walk(dataset, 0, len(dataset), not implicit, None, pixel, found)
    except (_Truncated, _Irregular, struct.error):
        return None
    raw = {}
    for tag, (vr, pos, length) in found.items():
        data = dataset[pos : pos + length] if length else empty_value_for_VR(vr, raw=True)
        raw[tag] = RawDataElement(BaseTag(tag), vr, length, data, pos, implicit, True, True, False)
    ds = _RawAttributes(raw)
    return ds, _scanned(dataset, pixel)


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
        raw = value(ds, keyword)
        number = as_int(raw)
        if number is None:
            return (
                f"{keyword} is absent" if raw is None else f"{keyword} {raw!s:.20} is not a number"
            )
        if number <= 0:
            return f"{keyword} is {number}; must be positive"
        dims[keyword] = number
    if dims["BitsAllocated"] not in _BITS_ALLOCATED:
        return f"BitsAllocated {dims['BitsAllocated']} is not 1, 8, 16, 32 or 64"
    for keyword in ("SamplesPerPixel", "NumberOfFrames"):
        number = as_int(value(ds, keyword))
        if number is not None and number <= 0:
            return f"{keyword} is {number}; must be positive"
        dims[keyword] = number or 1
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


def _undecodable(exc: Exception, command_sop_instance: str | None) -> InvalidInstance:
    """0xC210 for a header pydicom cannot parse; the reason names the error's type only (its
    message may quote header values)."""
    return InvalidInstance(
        STATUS_UNDECODABLE,
        f"cannot decode data set header: {type(exc).__name__}",
        command_sop_instance,
    )


def _parse(data: bytes, command_sop_instance: str | None) -> tuple[Dataset, dict[str, str], str]:
    """The data set (no pixels), its required UIDs and its transfer syntax; 0xC210 if the
    header cannot be parsed."""
    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
        uids = {k: as_uid(value(ds, k)) for k in REQUIRED_UIDS}
        ts = str(ds.file_meta.TransferSyntaxUID)
    except Exception as exc:
        raise _undecodable(exc, command_sop_instance) from None
    return ds, uids, ts


def _before_pixels(tag: int, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS


def _parse_dataset(
    dataset: bytes, transfer_syntax: str, command_sop_instance: str | None
) -> tuple[Dataset, dict[str, str]]:
    """As :func:`_parse` for a data set alone in ``transfer_syntax`` (as C-STORE delivers it):
    the same pydicom reader that ``dcmread`` uses on the data set part of a file, with the
    encoding ``dcmread`` derives from the transfer syntax, but without building, parsing and
    copying a file meta group first (that cost about a third of the parse). A deflated data set
    goes through ``dcmread``, which inflates it."""
    if transfer_syntax == _DEFLATED:
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = transfer_syntax
        part10 = b"\0" * 128 + b"DICM" + encode_file_meta(meta) + dataset
        ds, uids, _ = _parse(part10, command_sop_instance)
        return ds, uids
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    try:
        ds = read_dataset(BytesIO(dataset), implicit, little, stop_when=_before_pixels)
        uids = {k: as_uid(value(ds, k)) for k in REQUIRED_UIDS}
    except Exception as exc:
        raise _undecodable(exc, command_sop_instance) from None
    return ds, uids


def _check_uids(
    uids: dict[str, str], command_sop_class: str | None, command_sop_instance: str | None
) -> None:
    """Raise :class:`InvalidInstance` for a missing (0xC211) or invalid (0xC212) UID, or a SOP
    Class/Instance UID other than the command's (0xA900)."""
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
    ds, uids, ts = _parse(data, command_sop_instance)
    dataset = data[dataset_offset:] if dataset_offset is not None else None
    return _checked_header(ds, uids, ts, dataset, command_sop_class, command_sop_instance)


def read_dataset_header(
    dataset: bytes,
    transfer_syntax: str,
    command_sop_class: str | None = None,
    command_sop_instance: str | None = None,
) -> Header:
    """:func:`read_header` (with its every check, the encoding's and PixelData's included) for
    a data set alone, encoded in ``transfer_syntax``: what a C-STORE request carries."""
    read = _read_wanted(dataset, transfer_syntax)
    if read is None:
        ds, uids = _parse_dataset(dataset, transfer_syntax, command_sop_instance)
        return _checked_header(
            ds, uids, transfer_syntax, dataset, command_sop_class, command_sop_instance
        )
    ds, scan = read
    uids = {k: as_uid(value(ds, k)) for k in REQUIRED_UIDS}
    return _checked_header(
        ds, uids, transfer_syntax, None, command_sop_class, command_sop_instance, scan
    )


def _checked_header(
    ds: Dataset | _RawAttributes,
    uids: dict[str, str],
    ts: str,
    dataset: bytes | None,
    command_sop_class: str | None,
    command_sop_instance: str | None,
    scan: EncodingScan | None = None,
) -> Header:
    """The checks of :func:`read_header` on a parsed data set; ``dataset`` (its bytes) None
    when its encoding is not to be checked, or when ``scan`` is its scan, done already."""
    if dataset is not None:
        scan = scan_encoding(dataset, ts)
        if scan.problem:
            raise InvalidInstance(
                STATUS_UNDECODABLE, f"cannot decode data set: {scan.problem}", command_sop_instance
            )
    _check_uids(uids, command_sop_class, command_sop_instance)
    header = Header(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=ts,
        plane=instance_plane(ds),
        modality=as_text(value(ds, "Modality"), 16),
        series_number=as_int(value(ds, "SeriesNumber")),
        series_description=as_text(value(ds, "SeriesDescription")),
        body_part=as_text(value(ds, "BodyPartExamined")),
        number_of_frames=as_int(value(ds, "NumberOfFrames")),
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
