"""STOW-RS into the node: Orthanc's own DICOMweb client uploads the real series, which goes
through the pipeline to the end; bad uploads get per-instance failures or a clear refusal, never
a 500; the multipart parser on hand-made bodies."""

from __future__ import annotations

import http.client
import json
import random
from pathlib import Path

import pydicom
import pytest
import requests

from dicom_node.web.stow import MultipartRelated
from tests.support.http import TOKENS, http_overrides, write_token_file
from tests.support.node import NodeProcess, send_with_storescu
from tests.support.orthanc import DICOMWEB_PLUGIN, OrthancServer
from tests.support.polling import wait_until

BOUNDARY = "stow-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def _body(parts: list[bytes], close: bool = True, content_type: str = "application/dicom"):
    out = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + p + b"\r\n"
        for p in parts
    )
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def test_parser_finds_the_parts_however_the_body_is_chunked():
    parts = [b"first\r\n--not-the-boundary\r\n", b"\x00" * 5000 + b"second", b"third"]
    body = b"preamble\r\n" + _body(parts)
    for seed in range(20):
        rng = random.Random(seed)
        parser, got, i = MultipartRelated(BOUNDARY.encode()), [], 0
        while i < len(body):
            step = rng.randint(1, 700)
            got += parser.feed(body[i : i + step])
            i += step
        assert [p.body for p in got] == parts and parser.close()
        assert all(p.headers["content-type"] == "application/dicom" for p in got)


def test_parser_notices_a_body_cut_off_mid_part():
    body = _body([b"one", b"two-and-more"])
    parser = MultipartRelated(BOUNDARY.encode())
    got = parser.feed(body[: body.index(b"two") + 3])
    assert [p.body for p in got] == [b"one"] and not parser.close()


@pytest.fixture
def node(tmp_path):
    tokens = write_token_file(tmp_path, "alice", "bob")
    overrides = {
        **http_overrides(tokens, stow_callers=["alice"], stow_max_bytes=64 << 20),
        "completion": {"quiet_seconds": 1, "check_interval_s": 0.3},
        "rules": [
            {
                "name": "thick-ct",
                "match": {"modality": ["CT"], "spacing_mm": [1.5, 10]},
                "action": {"target_spacing_mm": 1.0, "destinations": [], "priority": 5},
            }
        ],
        "model": {"device": "cpu"},
    }
    with NodeProcess(tmp_path / "node", overrides=overrides) as n:
        yield n


def _url(node: NodeProcess, path: str = "/dicomweb/studies") -> str:
    return f"http://127.0.0.1:{node.config['http']['port']}{path}"


def _post(node, body: bytes, token: str | None = TOKENS["alice"], ctype: str = CONTENT_TYPE):
    headers = {"Content-Type": ctype}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(_url(node), data=body, headers=headers, timeout=60)


def _failed(response) -> list[int]:
    items = (response.json().get("00081198") or {}).get("Value", [])
    return [i["00081197"]["Value"][0] for i in items]


def _stored(response) -> list[str]:
    items = (response.json().get("00081199") or {}).get("Value", [])
    return [i["00081155"]["Value"][0] for i in items]


def test_bad_uploads_are_refused_clearly(node, sample_data):
    files = sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm"))[:2]
    good = [f.read_bytes() for f in files]
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]

    assert _post(node, _body(good), token=None).status_code == 401
    assert _post(node, _body(good), token=TOKENS["bob"]).status_code == 403  # not a stow caller
    assert _post(node, _body(good), ctype="application/dicom").status_code == 415

    not_dicom = _post(node, _body([b"this is not DICOM at all"]))
    assert not_dicom.status_code == 409 and _failed(not_dicom) == [0xC210]
    assert "not a DICOM" in not_dicom.headers["warning"]

    other_type = _post(node, _body(good[:1], content_type="application/pdf"))
    assert other_type.status_code == 409 and "application/pdf" in other_type.headers["warning"]

    # The second part is cut off: the first is stored, the second fails with its reason.
    cut = _body(good)
    cut = cut[: cut.rindex(f"--{BOUNDARY}\r\n".encode()) + 200]
    partial = _post(node, cut)
    assert partial.status_code == 202, partial.text
    assert _stored(partial) == uids[:1] and _failed(partial) == [0xC000]
    assert "body ended mid-part" in partial.headers["warning"]

    # A 2 GB upload is refused by its Content-Length, before any of it is read.
    conn = http.client.HTTPConnection("127.0.0.1", node.config["http"]["port"], timeout=30)
    conn.putrequest("POST", "/dicomweb/studies")
    conn.putheader("Content-Type", CONTENT_TYPE)
    conn.putheader("Authorization", f"Bearer {TOKENS['alice']}")
    conn.putheader("Content-Length", str(2 << 30))
    conn.endheaders()
    big = conn.getresponse()
    assert big.status == 413 and "at most" in json.loads(big.read())["error"]
    conn.close()

    # Only the one good part is in the index; the resend of both is stored and deduplicated.
    assert node.sqlite("select count(*) from instances")[0][0] == 1
    both = _post(node, _body(good))
    assert both.status_code == 200 and sorted(_stored(both)) == sorted(uids)
    assert node.sqlite("select count(*) from instances")[0][0] == 2
    calling = {r[0] for r in node.sqlite("select calling_ae from instances")}
    assert calling == {"alice"}  # the token's name stands where the calling AE title would


@pytest.mark.slow
@pytest.mark.skipif(not DICOMWEB_PLUGIN, reason="orthanc-dicomweb is not installed")
def test_orthanc_uploads_the_real_series_by_stow_rs(tmp_path, node, sample_data):
    sources = sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm"))
    servers = {
        "node": {
            "Url": _url(node, "/dicomweb/"),
            "HttpHeaders": {"Authorization": f"Bearer {TOKENS['alice']}"},
        }
    }
    with OrthancServer(
        tmp_path / "orthanc", aet="ORTHANC", dicomweb=True,
        config_overrides={"DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": servers}},
    ) as pacs:  # fmt: skip
        assert len(send_with_storescu(sources, pacs.dicom_port, called_ae="ORTHANC").acknowledged)
        (study,) = pacs.get("/studies")
        r = requests.post(
            f"{pacs.url}/dicom-web/servers/node/stow",
            json={"Resources": [study], "Synchronous": True},
            timeout=120,
        )
        assert r.ok, r.text
    assert node.sqlite("select count(*) from instances")[0][0] == len(sources)
    job = wait_until(
        lambda: (
            (rows := node.sqlite("select state, reason from jobs"))
            and rows[0][0] == "sent"
            and rows[0]
        ),
        300,
        "the job of the uploaded series",
        interval=1,
    )
    assert job[1] == "no destinations: kept locally"


def test_the_node_sends_to_a_bearer_token_server_and_a_wrong_token_is_permanent(
    node, sample_data, tmp_path
):
    """The STOW-RS client (a dicomweb destination with a bearer token) against the node's own
    STOW-RS endpoint, which checks bearer tokens."""
    from dicom_node.config import parse_config
    from dicom_node.send import FailureKind
    from dicom_node.stow import StowTarget, stow_instances

    files = sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm"))[:3]

    def target(token: str) -> StowTarget:
        path = tmp_path / f"token-{len(token)}-{token[:3]}"
        path.write_text(token + "\n")
        dest = {
            "type": "dicomweb",
            "name": "node",
            "url": _url(node, "/dicomweb"),
            "auth": {"type": "bearer", "token_file": str(path)},
            "batch_size": 2,
        }
        return StowTarget(parse_config({"destinations": [dest]}).destination("node"))

    wrong = stow_instances(target("not-a-valid-token-at-all-xyz"), files)
    assert wrong.failure.kind is FailureKind.PERMANENT and "HTTP 401" in wrong.failure.reason
    assert "not-a-valid" not in wrong.failure.reason
    ok = stow_instances(target(TOKENS["alice"]), files)
    assert ok.ok and len(ok.sent_now) == 3
    assert node.sqlite("select count(*) from instances")[0][0] == 3
