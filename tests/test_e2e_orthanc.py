"""End to end with a real PACS: storescu -> node -> ACVTT -> derived series -> Orthanc.

Orthanc (Debian) plays the PACS on loopback ports; the node runs as ``dicom-node serve`` in a
subprocess; dcmtk's storescu sends the real 20-slice CT series. Everything is checked through
Orthanc's REST API and with dicom3tools. The model is the shipped default (small enough for a
2-core CPU), and one inference run serves both the reprocess and the PACS-outage checks (the
reprocess is sent while Orthanc is down).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.support.node import NodeProcess, send_with_storescu
from tests.support.orthanc import DICOMWEB_PLUGIN, OrthancServer
from tests.support.polling import wait_until

pytestmark = pytest.mark.slow

DCIODVFY = "/usr/bin/dciodvfy"
DCENTVFY = "/usr/bin/dcentvfy"
FACTOR = 2  # 2.0 mm source spacing, 1.0 mm target


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error")]


def _job(node: NodeProcess, job_id: int | None = None) -> dict | None:
    cols = "id, state, reason, send_attempts, derived_series_uid, supersedes_job_id"
    where = f"where id = {int(job_id)}" if job_id else "order by id desc limit 1"
    rows = node.sqlite(f"select {cols} from jobs {where}")
    return dict(zip([c.strip() for c in cols.split(",")], rows[0], strict=True)) if rows else None


def _orthanc_series(pacs: OrthancServer) -> list[dict]:
    return [pacs.get(f"/series/{sid}") for sid in pacs.get("/series")]


@pytest.fixture
def pacs(tmp_path):
    with OrthancServer(tmp_path / "orthanc", aet="PACS") as server:
        yield server


@pytest.fixture
def web_pacs(tmp_path):
    """A second Orthanc that receives by STOW-RS only (Debian's DICOMweb plugin), with a
    password."""
    if not DICOMWEB_PLUGIN:
        pytest.skip("orthanc-dicomweb is not installed")
    users = {"node": "web-secret"}
    with OrthancServer(tmp_path / "orthanc-web", aet="WEB", dicomweb=True, users=users) as s:
        yield s


def test_end_to_end_with_orthanc(tmp_path, sample_data, pacs, web_pacs):
    sources = sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm"))
    source_ds = pydicom.dcmread(sources[0], stop_before_pixels=True)
    n_in = len(sources)
    n_out = (n_in - 1) * FACTOR + 1
    password = tmp_path / "web-password"
    password.write_text("web-secret\n")
    overrides = {
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port},
            {
                "type": "dicomweb",
                "name": "web",
                "url": f"{web_pacs.url}/dicom-web",
                "auth": {"type": "basic", "username": "node", "password_file": str(password)},
            },
        ],
        "completion": {"quiet_seconds": 1, "check_interval_s": 0.5},
        "rules": [
            {
                "name": "thick-ct",
                "match": {"modality": ["CT"], "spacing_mm": [1.5, 10]},
                "action": {
                    "target_spacing_mm": 1.0,
                    "destinations": ["pacs", "web"],
                    "priority": 5,
                },
            }
        ],
        "model": {"device": "cpu"},
    }
    with NodeProcess(tmp_path / "node", overrides=overrides) as node:
        # 1. The real series, and a geometry-broken one (real CT slices with a 202 mm gap).
        sent = send_with_storescu(sources, node.port)
        assert sent.returncode == 0 and len(sent.acknowledged) == n_in, sent.output[-2000:]
        broken = sorted(p for p in Path(sample_data.pydicom_ct2).iterdir() if p.is_file())
        assert len(send_with_storescu(broken, node.port).acknowledged) == len(broken)

        # The broken series ends rejected with a readable reason while the job runs.
        broken_uid = str(pydicom.dcmread(broken[0], stop_before_pixels=True).SeriesInstanceUID)
        state = wait_until(
            lambda: (
                node.sqlite(
                    "select state, state_reason from series where series_uid = ?", broken_uid
                )[0]
                if node.sqlite(
                    "select 1 from series where series_uid = ? and state != 'receiving'", broken_uid
                )
                else None
            ),
            60,
            "the broken series to be checked",
        )
        assert state[0] == "rejected" and "gap" in state[1], state

        job = wait_until(
            lambda: (j := _job(node)) and j["state"] in ("sent", "failed", "rejected") and j,
            240,
            "the job to be sent",
            interval=1,
        )
        assert job["state"] == "sent", (job, node.log_tail())
        derived_uid = job["derived_series_uid"]

        # 2. What Orthanc holds, through its REST API.
        series = _orthanc_series(pacs)
        assert len(series) == 1
        ser = series[0]
        assert ser["MainDicomTags"]["SeriesInstanceUID"] == derived_uid
        assert len(ser["Instances"]) == n_out
        study = pacs.get(f"/studies/{ser['ParentStudy']}")
        assert study["MainDicomTags"]["StudyInstanceUID"] == source_ds.StudyInstanceUID
        assert study["PatientMainDicomTags"]["PatientID"] == source_ds.PatientID
        tags = pacs.get(f"/instances/{ser['Instances'][0]}/simplified-tags")
        assert tags["FrameOfReferenceUID"] == source_ds.FrameOfReferenceUID
        assert tags["ImageType"].split("\\")[0] == "DERIVED"
        ordered = pacs.get(f"/series/{ser['ID']}/ordered-slices")
        assert ordered["Type"] == "Volume"
        positions = []
        for path in ordered["Dicom"]:
            t = pacs.get(f"{path}/simplified-tags".replace("/file", ""))
            positions.append([float(v) for v in t["ImagePositionPatient"].split("\\")])
        steps = np.linalg.norm(np.diff(np.asarray(positions), axis=0), axis=1)
        np.testing.assert_allclose(steps, 2.0 / FACTOR, atol=1e-3)
        first_uids = pacs.instance_uids()
        assert len(first_uids) == n_out

        # The same derived series went out by STOW-RS to the DICOMweb destination.
        (web_series,) = _orthanc_series(web_pacs)
        assert web_series["MainDicomTags"]["SeriesInstanceUID"] == derived_uid
        assert len(web_series["Instances"]) == n_out
        assert web_pacs.instance_uids() == first_uids
        web_ordered = web_pacs.get(f"/series/{web_series['ID']}/ordered-slices")
        assert web_ordered["Type"] == "Volume"
        echo_web = node.cli("echo", "web")
        assert echo_web.returncode == 0 and "QIDO-RS answered HTTP 200" in echo_web.stdout
        assert "web-secret" not in echo_web.stdout + echo_web.stderr

        # 3. dciodvfy on every derived file as Orthanc stored it; dcentvfy over source+derived.
        files_dir = tmp_path / "from-orthanc"
        files_dir.mkdir()
        derived_files = []
        for i, oid in enumerate(ser["Instances"]):
            path = files_dir / f"{i:03d}.dcm"
            path.write_bytes(pacs_file(pacs, oid))
            derived_files.append(path)
        for path in derived_files:
            out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
            assert _errors(out.stdout + out.stderr) == [], (path, out.stderr[-2000:])
        out = subprocess.run(
            [DCENTVFY, *map(str, sources + derived_files)], capture_output=True, text=True
        )
        assert _errors(out.stdout + out.stderr) == [], out.stderr[-2000:]

        # 4. PACS down when the send starts; a forced reprocess runs meanwhile.
        pacs.stop()
        src_uid = str(source_ds.SeriesInstanceUID)
        rep = node.cli("reprocess", src_uid, "--force")
        assert rep.returncode == 0 and f"requeued job {job['id']}" in rep.stdout, rep
        wait_until(
            lambda: (
                (j := _job(node, job["id"]))
                and j["state"] == "written"
                and (j["send_attempts"] or 0) >= 2
            ),
            240,
            "two failed send attempts while the PACS is down",
            interval=1,
        )
        shown = node.cli("jobs", "show", str(job["id"]))
        assert "next send attempt" in shown.stdout and "preview:" in shown.stdout, shown.stdout
        # Each destination's line: acknowledgements, attempts, and why the last one failed.
        assert re.search(r"to \S+: \d+ of \d+ acknowledged, \d+ attempt", shown.stdout)
        assert "cannot connect" in shown.stdout, shown.stdout
        pacs.start()
        again = wait_until(
            lambda: (j := _job(node, job["id"])) and j["state"] in ("sent", "failed") and j,
            120,
            "delivery after the PACS came back",
            interval=1,
        )
        assert again["state"] == "sent", again
        assert again["derived_series_uid"] == derived_uid  # same input, same UIDs
        series = _orthanc_series(pacs)
        assert len(series) == 1 and len(series[0]["Instances"]) == n_out  # no duplicates
        assert pacs.instance_uids() == first_uids

        # 5. The CLI shows the job, its stages and preview.
        listed = node.cli("jobs", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert '"state": "sent"' in listed.stdout
        shown = node.cli("jobs", "show", str(job["id"]), "--json")
        assert shown.returncode == 0, shown.stderr
        detail = json.loads(shown.stdout)
        preview = detail["preview_path"]  # on this node, under its spool
        sends = detail["sends"]  # the same description as the API's: one per destination
        assert [x["destination"] for x in sends] == detail["destinations"]
        for send in sends:
            assert send["acknowledged"] == send["of"] == n_out and send["last_failure"] is None
        assert any(e["kind"] == "send_attempt" for e in detail["audit"])
        assert preview and Path(preview).exists()
        rules = node.cli("rules", "test", src_uid)
        assert rules.returncode == 0 and "MATCH" in rules.stdout, rules.stdout
        rules = node.cli("rules", "test", broken_uid)
        assert rules.returncode == 1 and "gap" in rules.stdout, rules.stdout
    shutil.rmtree(files_dir, ignore_errors=True)


def pacs_file(pacs: OrthancServer, oid: str) -> bytes:
    import requests

    r = requests.get(f"{pacs.url}/instances/{oid}/file", timeout=30)
    r.raise_for_status()
    return r.content
