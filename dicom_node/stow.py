"""STOW-RS client: send a derived series to a DICOMweb destination, and say what happened.

:func:`stow_instances` is the DICOMweb counterpart of :func:`dicom_node.send.send_instances` and
returns the same :class:`~dicom_node.send.SendResult`, so that delivery treats both alike. It
POSTs the instances that are not yet acknowledged to ``{base}/studies/{StudyInstanceUID}`` as
``multipart/related; type="application/dicom"``, ``batch_size`` instances per request, and reads
the STOW-RS response (PS3.18 10.5.3) per instance:

* in the ReferencedSOPSequence (0008,1199): stored (a WarningReason (0008,1196) is kept in the
  detail) -> acknowledged, reported through ``on_ack`` as it arrives, like a C-STORE response;
* in the FailedSOPSequence (0008,1198) with a FailureReason (0008,1197): refused -> a
  **permanent** failure naming the reason code.

Failures of the request itself are classified like C-STORE failures: a connection error, a
timeout, HTTP 408, 429 and 5xx are **transient** (a ``Retry-After`` header is honoured as the
least delay before the next attempt); 401/403 (credentials), 404 (wrong URL) and every other 4xx
are **permanent**, with the status and the server's message. Credentials are read from files
named in the configuration, sent only in the Authorization header and never logged: the
destination prints as its base URL.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path

import pydicom
import requests

from dicom_node.config import DicomWebDestination
from dicom_node.send import FailureKind, InstanceOutcome, SendFailure, SendResult
from dicom_node.uids import is_valid_uid

__all__ = [
    "StowTarget",
    "encode_multipart",
    "find_stored",
    "parse_stow_response",
    "stow_echo",
    "stow_instances",
]

log = logging.getLogger(__name__)

_REFERENCED = "00081199"
_FAILED = "00081198"
_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
_TRANSIENT_HTTP = {408, 425, 429}


class StowTarget:
    """A configured DICOMweb destination with its credentials loaded (never printed)."""

    def __init__(self, dest: DicomWebDestination):
        self.name = dest.name
        self.base_url = str(dest.url).rstrip("/")
        self.timeout_s = dest.timeout_s
        self.batch_size = dest.batch_size
        self.verify: str | bool = str(dest.ca_file) if dest.ca_file else True
        self._headers: dict[str, str] = {}
        self._auth: tuple[str, str] | None = None
        auth = dest.auth
        if auth.type == "basic":
            self._auth = (auth.username or "", _read_secret(auth.password_file))
        elif auth.type == "bearer":
            self._headers["Authorization"] = f"Bearer {_read_secret(auth.token_file)}"

    def __str__(self) -> str:  # what logs and the CLI show: never a credential
        return f"{self.name} ({self.base_url})"

    def post(self, url: str, body: bytes, content_type: str) -> requests.Response:
        headers = {
            **self._headers,
            "Content-Type": content_type,
            "Accept": "application/dicom+json",
        }
        return requests.post(
            url,
            data=body,
            headers=headers,
            auth=self._auth,
            timeout=self.timeout_s,
            verify=self.verify,
        )

    def get(self, url: str, **params: str) -> requests.Response:
        return requests.get(
            url,
            params=params,
            headers={**self._headers, "Accept": "application/dicom+json"},
            auth=self._auth,
            timeout=self.timeout_s,
            verify=self.verify,
        )


def _read_secret(path: Path | None) -> str:
    if path is None:
        return ""
    return Path(path).read_text().strip()


def encode_multipart(parts: Sequence[bytes], boundary: str) -> bytes:
    """A ``multipart/related`` body (RFC 2387) of DICOM files, one part each."""
    out: list[bytes] = []
    for data in parts:
        out.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii"))
        out.append(data)
        out.append(b"\r\n")
    out.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def parse_stow_response(payload: object) -> tuple[dict[str, str], dict[str, str]]:
    """(acknowledged UID -> detail, failed UID -> reason) from a STOW-RS response body (the
    DICOM JSON model). Unknown shapes give two empty maps."""
    ds = payload[0] if isinstance(payload, list) and payload else payload
    if not isinstance(ds, dict):
        return {}, {}

    def items(tag: str) -> list[dict]:
        return [i for i in (ds.get(tag) or {}).get("Value", []) if isinstance(i, dict)]

    def value(item: dict, tag: str) -> object:
        v = (item.get(tag) or {}).get("Value") or [None]
        return v[0]

    acked = {}
    for item in items(_REFERENCED):
        uid = str(value(item, _SOP_INSTANCE) or "")
        warning = value(item, _WARNING_REASON)
        acked[uid] = f"warning 0x{int(warning):04X}" if isinstance(warning, int) else ""
    failed = {}
    for item in items(_FAILED):
        uid = str(value(item, _SOP_INSTANCE) or "")
        code = value(item, _FAILURE_REASON)
        failed[uid] = f"failure reason 0x{int(code):04X}" if isinstance(code, int) else "failed"
    return acked, failed


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _http_failure(target: StowTarget, response: requests.Response) -> SendFailure:
    text = " ".join(response.text.split())[:200]
    why = f"{target} answered HTTP {response.status_code}" + (f": {text}" if text else "")
    code = response.status_code
    if code in _TRANSIENT_HTTP or code >= 500:
        return SendFailure(FailureKind.TRANSIENT, why, retry_after_s=_retry_after(response))
    if code in (401, 403):
        why += " (check the destination's credentials)"
    return SendFailure(FailureKind.PERMANENT, why)


def _batches(items: list[tuple[int, Path, str, str]], size: int) -> Iterator[list]:
    """Batches of at most ``size`` instances, each batch of one study (one URL)."""
    batch: list = []
    for item in items:
        if batch and (len(batch) >= size or batch[-1][3] != item[3]):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def stow_instances(
    target: StowTarget,
    instances: Sequence[Path | str],
    *,
    already_acknowledged: Collection[str] = (),
    on_ack: Callable[[str, int], None] | None = None,
) -> SendResult:
    """POST the unacknowledged ``instances`` (files) in batches; stops at the first failure."""
    t0 = time.monotonic()
    done = set(already_acknowledged)
    outcomes: dict[int, InstanceOutcome] = {}
    todo: list[tuple[int, Path, str, str]] = []
    for i, src in enumerate(instances):
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        sop, study = str(ds.get("SOPInstanceUID", "")), str(ds.get("StudyInstanceUID", ""))
        if sop in done:
            outcomes[i] = InstanceOutcome(sop, True, detail="acknowledged earlier")
        else:
            todo.append((i, Path(src), sop, study))
    uids = {i: sop for i, _, sop, _ in todo} | {i: o.sop_instance_uid for i, o in outcomes.items()}
    failure: SendFailure | None = None
    if any(not (is_valid_uid(sop) and is_valid_uid(study)) for _, _, sop, study in todo):
        failure = SendFailure(FailureKind.PERMANENT, "an instance lacks valid SOP/Study UIDs")
        todo = []
    for batch in _batches(todo, target.batch_size):
        failure = _post_batch(target, batch, outcomes, on_ack)
        if failure is not None:
            break
    full = [
        outcomes.get(i, InstanceOutcome(uids[i], False, detail="not sent"))
        for i in range(len(instances))
    ]
    res = SendResult(target, full, failure, elapsed_s=time.monotonic() - t0)
    res.log_summary("stow")
    return res


def _post_batch(
    target: StowTarget,
    batch: list[tuple[int, Path, str, str]],
    outcomes: dict[int, InstanceOutcome],
    on_ack: Callable[[str, int], None] | None,
) -> SendFailure | None:
    boundary = f"acvtt-{uuid.uuid4().hex}"
    try:
        body = encode_multipart([p.read_bytes() for _, p, _, _ in batch], boundary)
    except OSError as exc:
        return SendFailure(FailureKind.PERMANENT, f"cannot read a derived file: {exc.strerror}")
    url = f"{target.base_url}/studies/{batch[0][3]}"
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    try:
        response = target.post(url, body, content_type)
    except requests.Timeout:
        return SendFailure(FailureKind.TRANSIENT, f"{target} did not answer in time")
    except requests.exceptions.SSLError as exc:
        return SendFailure(FailureKind.PERMANENT, f"TLS with {target} failed: {exc}")
    except requests.ConnectionError:
        return SendFailure(FailureKind.TRANSIENT, f"cannot connect to {target}")
    if response.status_code not in (200, 202, 409):
        return _http_failure(target, response)
    try:
        acked, failed = parse_stow_response(response.json())
    except (ValueError, json.JSONDecodeError):
        acked, failed = {}, {}
    failure = None
    for i, _, sop, _ in batch:
        if sop in acked:
            outcomes[i] = InstanceOutcome(sop, True, status=0, sent_now=True, detail=acked[sop])
            if on_ack is not None:
                on_ack(sop, 0)
        else:
            why = failed.get(sop, "not in the server's response")
            outcomes[i] = InstanceOutcome(sop, False, sent_now=True, detail=why)
            failure = failure or SendFailure(
                FailureKind.PERMANENT, f"{target} refused {sop}: {why}"
            )
    return failure


def find_stored(target: StowTarget, study_uid: str, series_uid: str) -> set[str] | None:
    """The SOP Instance UIDs of the series that the server holds (QIDO-RS), or None when it
    cannot tell: asked before resending after a cut-off attempt, like C-FIND for DIMSE."""
    url = f"{target.base_url}/studies/{study_uid}/series/{series_uid}/instances"
    try:
        response = target.get(url)
    except requests.RequestException:
        return None
    if response.status_code == 204 or (response.status_code == 404 and not response.content):
        return set()
    if response.status_code != 200:
        return None
    try:
        rows = response.json()
    except ValueError:
        return None
    found = set()
    for row in rows if isinstance(rows, list) else []:
        value = ((row or {}).get("00080018") or {}).get("Value") or []
        if value and is_valid_uid(str(value[0])):
            found.add(str(value[0]))
    return found


def stow_echo(target: StowTarget) -> tuple[int | None, SendFailure | None, float]:
    """Check a DICOMweb destination with a QIDO-RS ``GET {base}/studies?limit=1``: (HTTP status,
    failure or None, seconds), classified like a send."""
    t0 = time.perf_counter()
    try:
        response = target.get(f"{target.base_url}/studies", limit="1")
    except requests.Timeout:
        return None, SendFailure(FailureKind.TRANSIENT, f"{target}: timeout"), 0.0
    except requests.exceptions.SSLError as exc:
        return None, SendFailure(FailureKind.PERMANENT, f"TLS with {target}: {exc}"), 0.0
    except requests.ConnectionError:
        return None, SendFailure(FailureKind.TRANSIENT, f"cannot connect to {target}"), 0.0
    seconds = time.perf_counter() - t0
    if response.status_code in (200, 204):
        return response.status_code, None, seconds
    return response.status_code, _http_failure(target, response), seconds
