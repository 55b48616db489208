"""DICOMweb delivery (STOW-RS) against a real Orthanc with Debian's DICOMweb plugin, plus the
response parser and encoder on hand-made cases."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import parse_config
from dicom_node.send import FailureKind
from dicom_node.stow import (
    StowTarget,
    encode_multipart,
    find_stored,
    parse_stow_response,
    stow_echo,
    stow_instances,
)
from tests.support.dcmtk import free_port
from tests.support.derived import small_derived_series
from tests.support.orthanc import DICOMWEB_PLUGIN, OrthancServer

pytestmark = pytest.mark.skipif(not DICOMWEB_PLUGIN, reason="orthanc-dicomweb not installed")

USER, PASSWORD = "node", "s3cret-pw"


@pytest.fixture(scope="module")
def derived_files(sample_data, tmp_path_factory) -> list[Path]:
    """A small derived series (9 instances) written from the real CT headers."""
    return small_derived_series(sample_data.ct_dicom_repaired, tmp_path_factory.mktemp("derived"))


def _uids(paths) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _target(tmp_path: Path, port: int, password: str = PASSWORD, batch: int = 4) -> StowTarget:
    secret = tmp_path / f"pw-{password}"
    secret.write_text(password + "\n")
    config = parse_config(
        {
            "destinations": [
                {
                    "type": "dicomweb",
                    "name": "web",
                    "url": f"http://127.0.0.1:{port}/dicom-web",
                    "auth": {"type": "basic", "username": USER, "password_file": str(secret)},
                    "batch_size": batch,
                    "timeout_s": 10,
                }
            ]
        }
    )
    return StowTarget(config.destination("web"))


@pytest.fixture
def pacs(tmp_path):
    server = OrthancServer(tmp_path / "orthanc", aet="PACS", dicomweb=True, users={USER: PASSWORD})
    with server:
        yield server


def test_stow_delivers_every_instance_in_batches(pacs, derived_files, tmp_path):
    target = _target(tmp_path, pacs.http_port, batch=4)
    acks: list[str] = []
    res = stow_instances(target, derived_files, on_ack=lambda uid, st: acks.append(uid))
    assert res.ok, res.failure
    assert set(acks) == _uids(derived_files) and len(acks) == len(derived_files)
    assert pacs.instance_uids() == _uids(derived_files)
    # The geometry arrived as written: positions of the stored instances equal the files'.
    ds0 = pydicom.dcmread(derived_files[0], stop_before_pixels=True)
    (series_id,) = pacs.get("/series")
    stored = pacs.get(f"/series/{series_id}/instances")
    positions = sorted(i["MainDicomTags"].get("ImagePositionPatient") for i in stored)
    assert len(stored) == len(derived_files)
    assert any(p.split("\\")[2] == str(ds0.ImagePositionPatient[2]) for p in positions)
    # QIDO-RS tells what is stored (used before a resend after a crash).
    study = str(ds0.StudyInstanceUID)
    assert find_stored(target, study, str(ds0.SeriesInstanceUID)) == _uids(derived_files)
    assert stow_echo(target)[1] is None


def test_resend_after_an_outage_skips_what_was_acknowledged(pacs, derived_files, tmp_path):
    target = _target(tmp_path, pacs.http_port, batch=3)
    first = stow_instances(target, derived_files[:4])
    assert first.ok
    pacs.stop()
    down = stow_instances(target, derived_files, already_acknowledged=first.acknowledged)
    assert down.failure.kind is FailureKind.TRANSIENT and "cannot connect" in down.failure.reason
    pacs.start()
    again = stow_instances(target, derived_files, already_acknowledged=first.acknowledged)
    assert again.ok
    assert set(again.sent_now) == _uids(derived_files) - first.acknowledged
    assert len(pacs.get("/series")) == 1 and len(pacs.get("/instances")) == len(derived_files)


def test_wrong_credentials_are_permanent_and_never_shown(pacs, derived_files, tmp_path):
    target = _target(tmp_path, pacs.http_port, password="wrong-pw")
    res = stow_instances(target, derived_files)
    assert res.failure.kind is FailureKind.PERMANENT
    assert "HTTP 401" in res.failure.reason and "credentials" in res.failure.reason
    assert "wrong-pw" not in res.failure.reason and "wrong-pw" not in str(target)
    status, failure, _ = stow_echo(target)
    assert status == 401 and failure.kind is FailureKind.PERMANENT
    assert pacs.get("/instances") == []


def test_unreachable_server_is_transient(derived_files, tmp_path):
    target = _target(tmp_path, free_port())
    res = stow_instances(target, derived_files)
    assert res.failure.kind is FailureKind.TRANSIENT and not res.acknowledged


def test_parse_stow_response_per_instance():
    body = [
        {
            "00081199": {
                "vr": "SQ",
                "Value": [
                    {"00081155": {"vr": "UI", "Value": ["1.2.3.1"]}},
                    {
                        "00081155": {"vr": "UI", "Value": ["1.2.3.2"]},
                        "00081196": {"vr": "US", "Value": [0xB000]},
                    },
                ],
            },
            "00081198": {
                "vr": "SQ",
                "Value": [
                    {
                        "00081155": {"vr": "UI", "Value": ["1.2.3.3"]},
                        "00081197": {"vr": "US", "Value": [0xA700]},
                    }
                ],
            },
        }
    ]
    acked, failed = parse_stow_response(json.loads(json.dumps(body)))
    assert acked == {"1.2.3.1": "", "1.2.3.2": "warning 0xB000"}
    assert failed == {"1.2.3.3": "failure reason 0xA700"}
    assert parse_stow_response("nonsense") == ({}, {})


def test_multipart_encoding_round_trips():
    from email import message_from_bytes

    parts = [b"DICM-one\r\n--not-a-boundary", b"\x00\x01two"]
    body = encode_multipart(parts, "b0und")
    msg = message_from_bytes(
        b'Content-Type: multipart/related; type="application/dicom"; boundary=b0und\r\n\r\n' + body
    )
    got = [p.get_payload(decode=True) for p in msg.get_payload()]
    assert got == parts
    assert all(p.get_content_type() == "application/dicom" for p in msg.get_payload())


def test_busy_server_is_transient_and_its_retry_after_is_kept(derived_files, tmp_path):
    """A server that answers 503 with Retry-After (as a DICOMweb archive under load does)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Busy(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(503)
            self.send_header("Retry-After", "120")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        res = stow_instances(_target(tmp_path, server.server_address[1]), derived_files)
    finally:
        server.shutdown()
    assert res.failure.kind is FailureKind.TRANSIENT and "HTTP 503" in res.failure.reason
    assert res.failure.retry_after_s == 120.0
