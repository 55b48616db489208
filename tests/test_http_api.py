"""The JSON API, authentication, CSRF, patient data, the audit trail and JSON logs, against a
real node that processed the real 20-slice series (issue 11).

One node for the module (``logging.format: json``, a token file with two names, dcmtk's
storescp as its PACS, the shipped model on the CPU); the series is sent with the patient name
and ID :data:`PATIENT_NAME` / :data:`PATIENT_ID` set, so that the tests can prove where those
appear (only to authenticated requests) and where they never do (anonymous pages, /metrics, the
log).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from tests.support.dcmtk import storescp
from tests.support.http import (
    PATIENT_ID,
    PATIENT_NAME,
    TOKENS,
    Web,
    http_overrides,
    patient_series,
    write_token_file,
)
from tests.support.node import NodeProcess, make_instances, send_with_storescu
from tests.support.polling import wait_until

pytestmark = pytest.mark.slow

ALICE = TOKENS["alice"]
RULE = {
    "name": "thick-ct",
    "match": {"modality": ["CT"], "spacing_mm": [1.5, 10]},
    "action": {"target_spacing_mm": 1.0, "destinations": ["pacs"], "priority": 5},
}
PATIENT_STRINGS = ("DOE^JANE", "DOE JANE", "JANE", PATIENT_ID)


def _job(web: Web, job_id: int) -> dict:
    return web.get(f"/api/jobs/{job_id}").json()


def _wait_job_state(web: Web, job_id: int, state: str, timeout: float = 300) -> dict:
    return wait_until(
        lambda: (j := _job(web, job_id))["state"] == state and j, timeout, f"job {state}"
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory, sample_data):
    base = tmp_path_factory.mktemp("http-api")
    token_file = write_token_file(base, "alice", "bob")
    sources = sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm"))
    files = patient_series(sources, base / "in", seed="http-api")
    with storescp(base / "pacs", ae_title="PACS") as pacs:
        overrides = {
            **http_overrides(token_file),
            "logging": {"format": "json"},
            "completion": {"quiet_seconds": 1, "check_interval_s": 0.3},
            "rules": [RULE],
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
            ],
            "model": {"device": "cpu"},
        }
        with NodeProcess(base / "node", overrides=overrides) as node:
            web = Web(node)
            web.wait_ready()
            sent = send_with_storescu(files, node.port)
            assert len(sent.acknowledged) == 20, sent.output[-2000:]
            jobs = wait_until(
                lambda: web.get("/api/jobs?state=sent").json()["jobs"], 300, "the job to be sent"
            )
            yield SimpleNamespace(
                node=node, web=web, job_id=jobs[0]["id"], series_uid=jobs[0]["source_series_uid"],
                base=base, sources=sources,
            )  # fmt: skip


def test_health_and_readiness(env):
    r = env.web.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "alive"
    r = env.web.get("/readyz")
    assert r.status_code == 200, r.text
    assert all(c["ok"] for c in r.json()["checks"].values())


def test_read_api_shows_the_processed_series(env):
    web = env.web
    series = web.get("/api/series").json()
    assert series["total"] == 1
    row = series["series"][0]
    assert row["series_uid"] == env.series_uid and row["n_instances"] == 20
    assert row["state"] == "processed" and row["latest_job"]["id"] == env.job_id

    job = _job(web, env.job_id)
    assert job["state"] == "sent" and job["n_in"] == 20 and job["n_out"] > 20
    assert set(job["stage_seconds"]) >= {"load", "inference", "write", "preview", "send"}
    (send,) = job["sends"]
    assert send["destination"] == "pacs"
    assert send["acknowledged"] == send["of"] == job["n_out"]
    assert send["attempts"] >= 1 and send["last_failure"] is None

    png = web.get(f"/api/jobs/{env.job_id}/preview.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"

    (dest,) = web.get("/api/destinations").json()["destinations"]
    assert dest["name"] == "pacs" and dest["last_success"] is not None
    assert dest["last_failure"] is None

    kinds = {e["kind"] for e in web.get("/api/audit?limit=200").json()["events"]}
    assert {"job_queued", "job_written", "job_sent", "send_attempt"} <= kinds
    overview = web.get("/api/overview").json()
    assert overview["jobs_by_state"] == {"sent": 1}
    assert overview["readiness"]["ready"] and overview["node"]["model"]["loaded"]


def test_patient_data_only_for_authenticated_requests(env):
    web = env.web
    uid = env.series_uid
    anonymous = [
        web.get(path).text
        for path in ("/", "/series", f"/series/{uid}", f"/jobs/{env.job_id}", "/audit",
                     "/metrics", "/api/overview", "/api/series", f"/api/series/{uid}",
                     f"/api/jobs/{env.job_id}", "/api/audit?limit=500")
    ]  # fmt: skip
    for text in anonymous:
        for s in PATIENT_STRINGS:
            assert s not in text
    assert "patient" not in web.get(f"/api/series/{uid}").json()

    detail = web.get(f"/api/series/{uid}", token=ALICE).json()
    assert detail["patient"] == {"name": PATIENT_NAME, "id": PATIENT_ID}
    page = web.get(f"/series/{uid}", token=ALICE).text
    assert PATIENT_ID in page and "DOE^JANE" in page
    # ... and who looked at it is on record.
    viewed = web.get("/api/audit?kind=patient_data_viewed").json()["events"]
    assert viewed and json.loads(viewed[0]["detail"])["by"] == "alice"
    assert viewed[0]["series_uid"] == uid and viewed[0]["peer"] == "127.0.0.1"


def test_actions_need_a_valid_token(env):
    web = env.web
    path = f"/api/series/{env.series_uid}/reprocess"
    r = web.post(path, json={"force": True})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = web.post(path, token="not-a-token-" + "x" * 20, json={"force": True})
    assert r.status_code == 401
    assert web.get("/api/jobs", token="wrong" * 5).status_code == 401
    r = web.post(f"/jobs/{env.job_id}/resend", data={"csrf": "x"})  # the console's form
    assert r.status_code == 401 and "log in" in r.text.lower()
    assert _job(web, env.job_id)["state"] == "sent"
    refused = web.get("/api/audit?kind=http_action_refused").json()["events"]
    assert len(refused) >= 3 and all(e["peer"] == "127.0.0.1" for e in refused)


def test_bad_requests_are_named(env):
    web = env.web
    assert web.get("/api/jobs?state=nope").status_code == 400
    assert "unknown state" in web.get("/api/jobs?state=nope").json()["error"]
    assert web.get("/api/series?limit=0").status_code == 400
    assert web.get("/api/jobs/999999").status_code == 404
    assert web.get("/api/series/1.2.3.4").status_code == 404
    assert web.get("/api/jobs/999999/preview.png").status_code == 404
    path = f"/api/series/{env.series_uid}/reprocess"
    assert web.post(path, token=ALICE, data="{not json").status_code == 400
    assert web.post(path, token=ALICE, json={"force": "yes"}).status_code == 400
    assert web.post("/api/series/1.2.3.4/reprocess", token=ALICE).status_code == 404


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def test_browser_session_csrf_and_cross_site(env):
    web = env.web
    browser = requests.Session()
    login = web.url("/login")
    r = browser.post(login, data={"token": "wrong-token-" + "y" * 20}, allow_redirects=False)
    assert r.status_code == 401
    r = browser.post(login, data={"token": TOKENS["bob"], "next": "//evil.example/"},
                     allow_redirects=False)  # fmt: skip
    assert r.status_code == 303 and r.headers["location"] == "/"  # no open redirect
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie

    page = browser.get(web.url(f"/jobs/{env.job_id}")).text
    token = _csrf(page)
    resend = web.url(f"/jobs/{env.job_id}/resend")
    assert browser.post(resend, data={}, allow_redirects=False).status_code == 403
    assert browser.post(resend, data={"csrf": "forged"}, allow_redirects=False).status_code == 403
    evil = {"Origin": "http://evil.example"}
    r = browser.post(resend, data={"csrf": token}, headers=evil, allow_redirects=False)
    assert r.status_code == 403
    assert _job(web, env.job_id)["state"] == "sent"  # nothing happened so far

    r = browser.post(resend, data={"csrf": token}, headers={"Origin": web.base},
                     allow_redirects=False)  # fmt: skip
    assert r.status_code == 303 and r.headers["location"] == f"/jobs/{env.job_id}"
    assert "will be sent again" in browser.get(web.url(r.headers["location"])).text
    _wait_job_state(web, env.job_id, "sent", 120)
    events = web.get("/api/audit?kind=resend").json()["events"]
    detail = json.loads(events[0]["detail"])
    assert detail == {"all": False, "by": "bob", "via": "http"}
    kinds = [e["kind"] for e in web.get("/api/audit?limit=300").json()["events"]]
    assert "http_login" in kinds and "http_login_failed" in kinds


def test_reprocess_is_the_cli_operation(env):
    web, node = env.web, env.node
    path = f"/api/series/{env.series_uid}/reprocess"
    r = web.post(path, token=ALICE, json={})
    assert r.status_code == 200 and r.json()["action"] == "already_done", r.text

    r = web.post(path, token=ALICE, json={"force": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["action"] == "requeued" and body["job_id"] == env.job_id
    assert body["state"] == "queued"
    # Nothing to resend while the job runs again (409, with the reason).
    r = web.post(f"/api/jobs/{env.job_id}/resend", token=ALICE)
    assert r.status_code == 409 and "nothing to resend yet" in r.json()["error"]
    # The CLI's reprocess is the same operation: it finds the same job already at work.
    cli = node.cli("reprocess", env.series_uid)
    assert cli.returncode == 0, cli.stderr
    assert re.search(rf"job {env.job_id} is already (queued|running)", cli.stdout), cli.stdout

    events = web.get("/api/audit?kind=reprocess").json()["events"]
    by_via = {(json.loads(e["detail"])["via"], json.loads(e["detail"])["by"]) for e in events}
    assert ("http", "alice") in by_via
    assert any(via == "cli" for via, _ in by_via)
    assert any(e["peer"] == "127.0.0.1" for e in events)
    # (Not waited for: the run itself is the pipeline's, tested elsewhere; it ends with the node.)


def test_a_series_that_cannot_be_processed_gives_409(env):
    one = make_instances(env.sources[:1], 1, env.base / "one", seed="http-api-one")
    assert len(send_with_storescu(one, env.node.port).acknowledged) == 1
    uid = wait_until(
        lambda: next(
            (s["series_uid"] for s in env.web.get("/api/series").json()["series"]
             if s["state"] == "rejected"), None),
        60, "the one-slice series to be rejected",
    )  # fmt: skip
    r = env.web.post(f"/api/series/{uid}/reprocess", token=ALICE, json={"force": True})
    assert r.status_code == 409 and "series rejected" in r.json()["error"]


def test_json_log_lines(env):
    lines = [ln for ln in env.node.log_path.read_text().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    stages = [r for r in records if r["message"].startswith("job stage ")]
    assert {r["stage"] for r in stages} >= {"load", "inference", "write", "preview", "send"}
    for r in stages:
        assert r["job_id"] == env.job_id and r["series_uid"] == env.series_uid
        assert isinstance(r["duration_s"], float)
    assert any(r.get("series_uid") == env.series_uid and "state" in r for r in records)
    text = "\n".join(lines)
    for s in PATIENT_STRINGS:
        assert s not in text
