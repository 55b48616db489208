"""The HTTP side's parts on their own: tokens and sessions, the ``http`` config checks, the
incremental last-success reader, JSON log lines, and ``serve``'s one-line refusals (issue 11)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

from dicom_node import db
from dicom_node.config import ConfigError, check_environment, parse_config
from dicom_node.logs import JsonFormatter
from dicom_node.web.auth import Authenticator, TokenFileError, read_token_file
from dicom_node.web.queries import LastSuccess
from tests.support.http import TOKENS, write_token_file
from tests.support.node import REPO_ROOT, dicom_node_command

# -- tokens and sessions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "holds no token"),
        ("# only a comment\n\n", "holds no token"),
        ("alice:short\n", "line 1: token is shorter than 20"),
        (f"alice:{'a' * 24}\nalice:{'b' * 24}\n", "line 2: name 'alice' appears twice"),
        (f"al ice:{'a' * 24}\n", "line 1: name must be"),
    ],
)
def test_token_file_problems_are_named(tmp_path, text, problem):
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(TokenFileError, match=problem) as info:
        read_token_file(path)
    assert "a" * 24 not in str(info.value)  # a message never quotes a token


def test_token_file_missing(tmp_path):
    with pytest.raises(TokenFileError, match="cannot read"):
        read_token_file(tmp_path / "none")


def test_bare_token_is_admin_and_names_are_kept(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{'z' * 30}\nbob:{TOKENS['bob']}\n")
    auth = Authenticator(path)
    assert auth.check_token("z" * 30) == "admin"
    assert auth.check_token(TOKENS["bob"]) == "bob"
    assert auth.check_token(TOKENS["bob"] + "x") is None
    assert auth.check_token("") is None and auth.check_token(None) is None


def test_changed_token_file_is_read_again_and_ends_sessions(tmp_path):
    path = write_token_file(tmp_path, "alice", "bob")
    auth = Authenticator(path)
    sess = auth.login(TOKENS["alice"])
    assert sess is not None and auth.session(sess.sid) is sess
    assert auth.login("wrong" * 5) is None
    path.write_text(f"bob:{TOKENS['bob']}\n# alice was removed\n")
    assert auth.check_token(TOKENS["alice"]) is None
    assert auth.session(sess.sid) is None  # her browser session ended with her token
    assert auth.check_token(TOKENS["bob"]) == "bob"
    path.write_text("unreadable now: too short\n")
    assert auth.check_token(TOKENS["bob"]) is None  # a broken file lets nobody in


def test_sessions_expire_and_csrf_must_match(tmp_path):
    now = [1000.0]
    auth = Authenticator(write_token_file(tmp_path, "alice"), session_hours=1, clock=lambda: now[0])
    sess = auth.login(TOKENS["alice"])
    assert auth.csrf_ok(sess, sess.csrf)
    assert not auth.csrf_ok(sess, sess.csrf[:-1] + "x") and not auth.csrf_ok(sess, None)
    other = auth.login(TOKENS["alice"])
    assert other.sid != sess.sid and other.csrf != sess.csrf
    now[0] += 3601
    assert auth.session(sess.sid) is None


def test_without_a_token_file_nobody_authenticates():
    auth = Authenticator(None)
    assert not auth.enabled
    assert auth.check_token(TOKENS["alice"]) is None and auth.login(TOKENS["alice"]) is None


# -- the http section of the config ----------------------------------------------------------------


def _config(tmp_path, **http) -> dict:
    (tmp_path / "spool").mkdir(exist_ok=True)
    return {
        "allowed_callers": [{"ae_title": "X", "host": "127.0.0.1"}],
        "storage": {"spool_dir": str(tmp_path / "spool")},
        "database": {"url": f"sqlite:///{tmp_path / 'node.db'}"},
        "http": {"enabled": True, **http},
    }


def test_network_address_without_authentication_is_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_config(_config(tmp_path, bind_address="0.0.0.0"))
    ((key, message),) = info.value.errors
    assert key == "http" and "0.0.0.0 is not a loopback address" in message
    with pytest.raises(ConfigError, match="anonymous_read: false needs auth_token_file"):
        parse_config(_config(tmp_path, anonymous_read=False))
    # Loopback needs no token; a disabled HTTP side is not checked at all.
    assert parse_config(_config(tmp_path, bind_address="::1")).http.bind_address == "::1"
    assert not parse_config(_config(tmp_path, enabled=False, bind_address="0.0.0.0")).http.enabled
    token_file = write_token_file(tmp_path, "alice")
    cfg = parse_config(_config(tmp_path, bind_address="0.0.0.0", auth_token_file=str(token_file)))
    assert check_environment(cfg) == []


def test_config_check_names_a_bad_token_file(tmp_path):
    bad = tmp_path / "tokens"
    bad.write_text("alice:tooshort\n")
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, auth_token_file=str(bad))))
    res = _cli("config", "check", "--config", str(path))
    assert res.returncode == 2
    assert f"error: {path}: http.auth_token_file: {bad}: line 1: token is shorter" in res.stderr


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*dicom_node_command(), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_serve_refuses_a_taken_http_port_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = _config(tmp_path, port=port)
        cfg["node"] = {"port": 0 + _free_port()}
        path = tmp_path / "node.yaml"
        path.write_text(yaml.safe_dump(cfg))
        res = _cli("serve", "--config", str(path))
    assert res.returncode == 2, res.stderr
    assert f"error: {path}: http.port: cannot listen on 127.0.0.1:{port}: " in res.stderr
    assert "Traceback" not in res.stderr


def test_serve_refuses_network_address_without_auth(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, bind_address="0.0.0.0")))
    res = _cli("serve", "--config", str(path))
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: http: bind_address 0.0.0.0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- last success per destination ----------------------------------------------------------------


def test_last_success_is_read_incrementally(tmp_path):
    url = f"sqlite:///{tmp_path / 'node.db'}"
    db.upgrade(url)
    cfg = parse_config(
        {"database": {"url": url},
         "destinations": [{"name": n, "ae_title": "X", "host": "127.0.0.1", "port": 104}
                          for n in ("pacs", "archive", "never")]}
    )  # fmt: skip
    sessions = db.make_session_factory(db.make_engine(url))
    t0 = datetime(2026, 1, 5, 8, 0, 0)

    def ack(dest: str, uid: str, at: datetime) -> None:
        with sessions() as s:
            series = db.Series(series_uid=f"s{uid}", study=db.Study(study_uid=f"st{uid}"))
            job = db.Job(series=series, source_series_uid=f"s{uid}", instances_hash=uid,
                         model_id="m", model_version="1", factor=2)  # fmt: skip
            s.add(db.SentInstance(job=job, destination=dest, sop_instance_uid=uid, status=0,
                                  sent_at=at))  # fmt: skip
            s.commit()

    last = LastSuccess()
    with sessions() as s:
        assert last.get(s, cfg) == {"pacs": None, "archive": None, "never": None}
    ack("pacs", "1", t0)
    ack("archive", "2", t0 + timedelta(minutes=5))
    with sessions() as s:
        assert last.get(s, cfg) == {"pacs": t0, "archive": t0 + timedelta(minutes=5), "never": None}
    ack("pacs", "3", t0 + timedelta(hours=1))
    with sessions() as s:
        got = last.get(s, cfg)
    assert got["pacs"] == t0 + timedelta(hours=1) and got["never"] is None
    # A fresh reader (a restarted node) finds the same from the table alone.
    with sessions() as s:
        assert LastSuccess().get(s, cfg) == got


# -- JSON log lines ------------------------------------------------------------------------------


def test_json_formatter_lifts_fields():
    fmt = JsonFormatter()
    record = logging.LogRecord(
        "dicom_node.infer", logging.INFO, __file__, 1,
        "job stage job_id=%s series_uid=%s stage=%s duration_s=%.3f",
        (7, "1.2.840.1234.5", "inference", 9.8125), None,
    )  # fmt: skip
    line = fmt.format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["job_id"] == 7 and out["series_uid"] == "1.2.840.1234.5"
    assert out["stage"] == "inference" and out["duration_s"] == pytest.approx(9.812)
    assert out["level"] == "INFO" and out["logger"] == "dicom_node.infer"
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed job_id=3", (),
                                   sys.exc_info())  # fmt: skip
    line = fmt.format(record)
    assert "\n" not in line and "second line" in json.loads(line)["exc"]


def test_example_config_documents_http(tmp_path):
    text = (Path(REPO_ROOT) / "config" / "node.example.yaml").read_text()
    data = yaml.safe_load(text)
    cfg = parse_config(data)
    assert "http" in data and "logging" in data
    assert cfg.http.bind_address == "127.0.0.1"


# -- the application in-process: who may read ----------------------------------------------------


def _serve(tmp_path, **http):
    """The real application on a loopback port, over an empty index (no receiver, no model)."""
    from datetime import UTC

    from dicom_node.web.context import NodeView
    from dicom_node.web.server import HttpServer

    url = f"sqlite:///{tmp_path / 'node.db'}"
    db.upgrade(url)
    cfg = parse_config({**_config(tmp_path, port=_free_port(), **http), "database": {"url": url}})
    view = NodeView(
        config=cfg,
        sessions=db.make_session_factory(db.make_engine(url)),
        started=datetime.now(UTC),
        runs_jobs=False,
    )
    server = HttpServer(view)
    server.start()
    return server, f"http://127.0.0.1:{server.port}"


def test_reads_need_a_token_when_anonymous_read_is_off(tmp_path):
    import requests

    token_file = write_token_file(tmp_path, "alice")
    server, base = _serve(tmp_path, anonymous_read=False, auth_token_file=str(token_file))
    try:
        for path in ("/", "/series", "/api/series", "/api/jobs", "/metrics", "/audit"):
            assert requests.get(base + path, timeout=10).status_code == 401, path
            bearer = {"Authorization": f"Bearer {TOKENS['alice']}"}
            assert requests.get(base + path, headers=bearer, timeout=10).status_code == 200, path
        assert requests.get(base + "/healthz", timeout=10).status_code == 200
        # /readyz answers without a token: here 503, since this test runs no receiver.
        ready = requests.get(base + "/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["reasons"] == [
            f"receiver: not listening on 127.0.0.1:{11112}"
        ]
        login = requests.get(base + "/login", timeout=10)
        assert login.status_code == 200
        headers = login.headers
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"
    finally:
        server.stop()


def test_without_a_token_file_the_console_is_read_only(tmp_path):
    import requests

    server, base = _serve(tmp_path)
    try:
        assert "read-only" in requests.get(base + "/", timeout=10).text
        r = requests.post(base + "/api/series/1.2.3/reprocess", json={}, timeout=10)
        assert r.status_code == 401 and "auth_token_file is not set" in r.json()["error"]
    finally:
        server.stop()


def test_destination_status_shows_dicomweb_destinations_by_url(tmp_path):
    from dicom_node.web.queries import destination_status

    url = f"sqlite:///{tmp_path / 'node.db'}"
    db.upgrade(url)
    token = tmp_path / "token"
    token.write_text("t0ken-never-shown\n")
    cfg = parse_config(
        {"database": {"url": url},
         "destinations": [
             {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104},
             {"name": "cloud", "type": "dicomweb", "url": "https://vna.example/dicom-web",
              "auth": {"type": "bearer", "token_file": str(token)}}]}
    )  # fmt: skip
    sessions = db.make_session_factory(db.make_engine(url))
    with sessions() as s:
        rows = {r["name"]: r for r in destination_status(s, cfg, LastSuccess())}
    assert rows["pacs"]["address"] == "PACS@10.0.0.5:104" and rows["pacs"]["type"] == "dimse"
    assert rows["cloud"]["address"] == "https://vna.example/dicom-web"
    assert rows["cloud"]["type"] == "dicomweb" and rows["cloud"]["tls"] is True
    assert "t0ken" not in repr(rows)


def test_the_overview_lists_every_processs_associations(tmp_path):
    """The console's open associations are the node's (the main process's and its additional
    receiving processes'), each with the process serving it."""
    import requests

    server, base = _serve(tmp_path)
    rows = [
        {"calling_ae": "CT1", "peer": "10.0.0.5", "port": 4001, "started": "2026-12-02T17:00:00",
         "stored": 12, "failed": 0, "pid": 4242},
        {"calling_ae": "CT2", "peer": "10.0.0.6", "port": 4002, "started": "2026-12-02T17:00:01",
         "stored": 3, "failed": 1, "pid": 4343},
    ]  # fmt: skip
    server.view.associations = lambda: rows
    try:
        page = requests.get(base + "/", timeout=10).text
        assert "Open associations (2)" in page
        for a in rows:
            assert f"<td>{a['calling_ae']}</td>" in page
            assert f'<td class="num">{a["pid"]}</td>' in page
    finally:
        server.stop()
