"""STOW-RS receive: ``POST /dicomweb/studies`` (and ``/dicomweb/studies/{study}``) into the same
spool, index and pipeline as C-STORE.

Each part of the ``multipart/related; type="application/dicom"`` body goes through
:meth:`dicom_node.receive.Receiver.store_part10`: the same UID and pixel checks, durable write,
index row and duplicate handling as a C-STORE instance, with the token's name where the calling
AE title would be (so rules can match it). The caller policy is a bearer token from
``http.auth_token_file`` (optionally only the names in ``http.stow_callers``); nobody uploads
anonymously or from a browser session.

The body is read as a stream and parsed part by part, so memory holds one instance at a time.
A body larger than ``http.stow_max_bytes`` is refused with 413, at once when Content-Length says
so, else as soon as the stream passes the limit. The answer is a STOW-RS response (PS3.18
10.5.3): stored instances in the ReferencedSOPSequence, refused ones in the FailedSOPSequence
with the DIMSE status as FailureReason, and the reasons as ``Warning`` headers; HTTP 200 when
every part was stored, 202 when some were, 409 when none was. Bad input is a per-part failure,
never a 500: a part that is not DICOM, a part of another type, a body cut off mid-part.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import pydicom
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from dicom_node.web.base import JSON, Refused

if TYPE_CHECKING:
    from dicom_node.web.app import WebApp

__all__ = ["MultipartRelated", "routes"]

# FailureReason values (PS3.18 Table 10.5.3-1 uses the C-STORE statuses).
PROCESSING_FAILURE = 0x0110
CANNOT_UNDERSTAND = 0xC000
DATASET_MISMATCH = 0xA900
OUT_OF_RESOURCES = 0xA700
MAX_PART_HEADER = 16 * 1024


def routes(web: WebApp) -> list[Route]:
    return [
        Route("/dicomweb/studies", partial(stow, web), methods=["POST"]),
        Route("/dicomweb/studies/{study}", partial(stow, web), methods=["POST"]),
    ]


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes


@dataclass
class MultipartRelated:
    """An incremental parser of a multipart body (RFC 2046 delimiters): :meth:`feed` chunks as
    they arrive and get the parts completed by them; :meth:`close` says whether the body ended
    with the closing delimiter."""

    boundary: bytes
    _buf: bytearray = field(default_factory=bytearray)
    _started: bool = False
    _done: bool = False

    def feed(self, chunk: bytes) -> list[Part]:
        self._buf += chunk
        parts: list[Part] = []
        if self._done:
            return parts
        if not self._started:
            first = self._buf.find(b"--" + self.boundary)
            if first < 0:
                return parts
            del self._buf[: first + 2 + len(self.boundary)]
            self._started = True
        delimiter = b"\r\n--" + self.boundary
        while not self._done:
            if self._buf[:2] == b"--":  # the closing delimiter
                self._done = True
                break
            end = self._buf.find(delimiter)
            if end < 0:
                break
            parts.append(_part(bytes(self._buf[:end])))
            del self._buf[: end + len(delimiter)]
        return parts

    def close(self) -> bool:
        """True when the body ended properly (closing delimiter seen)."""
        return self._done

    @property
    def pending(self) -> int:
        """Bytes held for a part not yet complete."""
        return len(self._buf)


def _part(raw: bytes) -> Part:
    # After the delimiter: optional transport padding, CRLF, headers, CRLF CRLF, content.
    raw = raw[raw.find(b"\r\n") + 2 :] if b"\r\n" in raw[:MAX_PART_HEADER] else raw
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:  # no headers at all: the whole part is content
        return Part({}, head if raw.startswith(b"\r\n") else raw)
    headers = {}
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip():
            headers[name.strip().lower()] = value.strip()
    return Part(headers, body)


_PARAM = re.compile(r';\s*([A-Za-z-]+)\s*=\s*("([^"]*)"|[^;\s]+)')


def _content_type(value: str) -> tuple[str, dict[str, str]]:
    main = value.split(";", 1)[0].strip().lower()
    params = {m.group(1).lower(): m.group(3) or m.group(2) for m in _PARAM.finditer(value)}
    return main, params


@dataclass
class Outcome:
    sop_class: str
    sop_uid: str
    status: int
    reason: str | None = None


def _identify(body: bytes) -> tuple[str, str, str]:
    """(SOP class, SOP instance, study) from a part, empty strings when unreadable."""
    try:
        ds = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True)
    except Exception:  # not DICOM: the store says why
        return "", "", ""
    return (
        str(ds.get("SOPClassUID", "") or ""),
        str(ds.get("SOPInstanceUID", "") or ""),
        str(ds.get("StudyInstanceUID", "") or ""),
    )


def _store_part(web: WebApp, part: Part, n: int, study: str | None, caller: str, peer: str):
    sop_class, sop_uid, part_study = _identify(part.body)
    ctype, params = _content_type(part.headers.get("content-type", "application/dicom"))
    if ctype != "application/dicom":
        return Outcome(sop_class, sop_uid, CANNOT_UNDERSTAND, f"part {n}: {ctype} is not DICOM")
    if study is not None and part_study and part_study != study:
        return Outcome(sop_class, sop_uid, DATASET_MISMATCH, f"part {n}: in another study")
    res = web.view.store_part10(part.body, caller, peer)
    reason = f"part {n}: {res.comment}" if res.status != 0 else None
    return Outcome(sop_class, sop_uid, res.status, reason)


def _who_may_store(web: WebApp, request: Request) -> str:
    who = web.identify(request)
    if who is None:
        raise Refused(401, "STOW-RS needs a bearer token (http.auth_token_file)")
    if who.session is not None:
        raise Refused(403, "STOW-RS takes a bearer token, not a browser session")
    allowed = web.http.stow_callers
    if allowed and who.name not in allowed:
        raise Refused(403, f"{who.name} may not store (http.stow_callers)")
    return who.name


async def stow(web: WebApp, request: Request) -> Response:
    caller = _who_may_store(web, request)
    if web.view.store_part10 is None:
        raise Refused(503, "this process does not receive instances")
    ctype, params = _content_type(request.headers.get("content-type", ""))
    if ctype != "multipart/related" or params.get("type", "").lower() != "application/dicom":
        raise Refused(415, 'the body must be multipart/related; type="application/dicom"')
    if not params.get("boundary"):
        raise Refused(400, "the Content-Type has no boundary")
    limit = web.http.stow_max_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise Refused(413, f"the body is {int(length)} bytes; at most {limit} are accepted")
    study = request.path_params.get("study")
    peer = web.peer(request) or ""
    parser = MultipartRelated(params["boundary"].encode("latin-1"))
    outcomes: list[Outcome] = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise Refused(413, f"the body passed {limit} bytes; the rest was not read")
            for part in parser.feed(chunk):
                n = len(outcomes) + 1
                outcomes.append(
                    await run_in_threadpool(_store_part, web, part, n, study, caller, peer)
                )
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is listening for an answer any more
    if not parser.close():
        outcomes.append(
            Outcome("", "", CANNOT_UNDERSTAND, f"part {len(outcomes) + 1}: body ended mid-part")
        )
    if not outcomes:
        raise Refused(400, "the body holds no parts")
    return _answer(outcomes)


def _answer(outcomes: list[Outcome]) -> Response:
    def ref(o: Outcome) -> dict:
        item = {
            "00081150": {"vr": "UI", "Value": [o.sop_class]} if o.sop_class else {"vr": "UI"},
            "00081155": {"vr": "UI", "Value": [o.sop_uid]} if o.sop_uid else {"vr": "UI"},
        }
        if o.status != 0:
            item["00081197"] = {"vr": "US", "Value": [o.status]}
        return item

    stored = [o for o in outcomes if o.status == 0]
    failed = [o for o in outcomes if o.status != 0]
    body: dict = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [ref(o) for o in stored]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [ref(o) for o in failed]}
    status = 200 if not failed else 202 if stored else 409
    warnings = ", ".join(
        f'299 dicom-node "{_quote(o.reason or "")}"' for o in failed[:20]
    )  # reasons for people; the codes are in the body
    headers = {"warning": warnings} if warnings else None
    return JSON(body, status_code=status, headers=headers, media_type="application/dicom+json")


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', "'")[:200]
