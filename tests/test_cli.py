"""``dicom-node`` admin commands, run as a user would (subprocesses), against a real node."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime

import pytest
import yaml

from tests.support.dcmtk import free_port
from tests.support.node import NodeProcess, dicom_node_command, send_with_storescu

QUIET = {"completion": {"quiet_seconds": 100000}}


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*dicom_node_command(), *args], capture_output=True, text=True, timeout=60, env=env
    )


def one_line_error(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("error:") for ln in lines), proc.stderr


@pytest.fixture(scope="module")
def node(tmp_path_factory, sample_data):
    """A node holding the real 20-slice series; it may C-ECHO itself as destination 'self'."""
    d = tmp_path_factory.mktemp("cli-node")
    port = free_port()
    overrides = {
        **QUIET,
        "destinations": [
            {"name": "self", "ae_title": "ACVTT", "host": "127.0.0.1", "port": port},
            {"name": "closed", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()},
            {"name": "wrongae", "ae_title": "NOTIT", "host": "127.0.0.1", "port": port},
        ],
    }
    callers = [("STORESCU", "127.0.0.1"), ("ECHOSCU", "127.0.0.1"), ("ACVTT", "127.0.0.1")]
    with NodeProcess(d, allowed_callers=callers, overrides=overrides, port=port) as n:
        files = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))
        assert send_with_storescu(files, n.port).acknowledged == set(files)
        yield n


def test_config_check_ok_and_errors(tmp_path, node):
    ok = node.cli("config", "check")
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"node": {"port": 0, "max_associations": 0}, "typo": 1}))
    proc = run("config", "check", "--config", str(bad))
    assert proc.returncode == 2
    one_line_error(proc)
    for key in ("node.port", "node.max_associations", "typo"):
        assert f": {key}: " in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 3
    missing = run("config", "check", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    one_line_error(missing)


def test_config_from_environment(tmp_path, node):
    env = {"DICOM_NODE_CONFIG": str(node.config_path), "PATH": "/usr/bin:/bin"}
    proc = run("config", "check", env=env)
    assert proc.returncode == 0, proc.stderr


def test_series_list_json_and_state_filter(node, sample_data):
    proc = node.cli("series", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    (series,) = json.loads(proc.stdout)
    assert series["n_instances"] == 20
    assert series["modality"] == "CT"
    assert series["state"] == "receiving"
    assert "state_reason" in series
    assert series["series_uid"].startswith("2.25.")
    assert json.loads(node.cli("series", "list", "--state", "receiving", "--json").stdout)
    assert json.loads(node.cli("series", "list", "--state", "rejected", "--json").stdout) == []
    bad = node.cli("series", "list", "--state", "bogus")
    assert bad.returncode == 2
    one_line_error(bad)
    table = node.cli("series", "list")
    assert table.returncode == 0 and series["series_uid"][:20] in table.stdout


def test_series_show(node):
    uid = json.loads(node.cli("series", "list", "--json").stdout)[0]["series_uid"]
    proc = node.cli("series", "show", uid, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["series_uid"] == uid and len(info["instances"]) == 20
    # The same description as the API's (operations.series_as_dict), times as ISO 8601 text.
    assert {"body_part", "hold_until", "revision", "calling_ae"} <= info.keys()
    received = datetime.fromisoformat(info["first_received"])
    assert received <= datetime.fromisoformat(info["last_received"])
    assert received.microsecond == 0 and received.tzinfo is None
    first = info["instances"][0]
    assert first["pixel_spacing"] == [0.9765625, 0.9765625]
    assert first["image_orientation"] == [1, 0, 0, 0, 1, 0]
    assert node.cli("series", "show", uid).returncode == 0
    missing = node.cli("series", "show", "1.2.3.4")
    assert missing.returncode == 3
    one_line_error(missing)


def test_status(node):
    proc = node.cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["node"]["running"] is True
    assert report["node"]["pid"] == node.proc.pid
    assert report["counts"]["instances"] == 20 and report["counts"]["series"] == 1
    assert report["series_by_state"] == {"receiving": 1}
    assert report["disk"]["free_bytes"] > 0
    assert report["associations"] == []
    text = node.cli("status")
    assert text.returncode == 0 and "running" in text.stdout and "instances 20" in text.stdout


def test_echo(node):
    ok = node.cli("echo", "self")
    assert ok.returncode == 0, ok.stderr
    assert "C-ECHO ok" in ok.stdout
    closed = node.cli("echo", "closed", "--timeout", "3")
    assert closed.returncode == 4
    one_line_error(closed)
    rejected = node.cli("echo", "wrongae")
    assert rejected.returncode == 4 and "rejected" in rejected.stderr
    one_line_error(rejected)
    unknown = node.cli("echo", "nowhere")
    assert unknown.returncode == 3
    one_line_error(unknown)


def test_db_upgrade_and_no_schema_error(tmp_path):
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database": {"url": f"sqlite:///{tmp_path}/fresh.db"},
                "storage": {"spool_dir": str(tmp_path / "spool")},
            }
        )
    )
    before = run("series", "list", "--config", str(cfg))
    assert before.returncode == 1
    one_line_error(before)
    assert "db upgrade" in before.stderr
    up = run("db", "upgrade", "--config", str(cfg))
    assert up.returncode == 0, up.stderr
    assert run("db", "upgrade", "--config", str(cfg)).returncode == 0  # idempotent
    after = run("series", "list", "--json", "--config", str(cfg))
    assert after.returncode == 0 and json.loads(after.stdout) == []
    status = run("status", "--json", "--config", str(cfg))
    assert status.returncode == 0 and json.loads(status.stdout)["node"]["running"] is False


def test_serve_reports_busy_port_in_one_line(tmp_path, node):
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "node": {"port": node.port},
                "allowed_callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}],
                "database": {"url": f"sqlite:///{tmp_path}/n.db"},
                "storage": {"spool_dir": str(tmp_path / "spool")},
            }
        )
    )
    proc = run("serve", "--config", str(cfg))
    assert proc.returncode == 1
    assert "cannot listen" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_commands():
    proc = run("--help")
    assert proc.returncode == 0
    for cmd in ("serve", "status", "series", "config", "echo", "db"):
        assert cmd in proc.stdout
    assert sys.executable  # the console script runs under this interpreter's venv


def test_text_from_the_database_prints_verbatim(tmp_path, sample_data):
    """Reasons and descriptions come from peers and DICOM headers: rich markup in them
    ('[lung]', '[/x]') must neither vanish nor crash the CLI."""
    from dicom_node import db

    proc = NodeProcess(tmp_path / "node")  # not started: the CLI reads the DB only
    assert proc.cli("db", "upgrade").returncode == 0
    reason = "rejected: gap [lung] at slice 7 [/x]"
    engine = db.make_engine(f"sqlite:///{proc.db_path}")
    with db.make_session_factory(engine)() as s:
        study = db.Study(study_uid="1.2.3")
        s.add(db.Series(series_uid="1.2.3.4", study=study, modality="CT", revision=0,
                        state=db.SeriesState.rejected, state_reason=reason))  # fmt: skip
        s.commit()
    engine.dispose()
    table = proc.cli("series", "list")
    assert table.returncode == 0, table.stderr
    assert "[lung]" in table.stdout and "[/x]" in table.stdout
    shown = proc.cli("series", "show", "1.2.3.4")
    assert shown.returncode == 0, shown.stderr
    assert reason in shown.stdout


def test_reprocess_and_resend_errors_are_one_line(tmp_path):
    """What an operator can get wrong: an unknown series or job (exit 3), a series that cannot
    be processed (exit 1, with the reason), a database without a schema (exit 1, names the fix)."""
    from dicom_node import db

    proc = NodeProcess(tmp_path / "node")  # not started: the CLI works on the DB alone
    no_schema = proc.cli("reprocess", "1.2.3.4")
    assert no_schema.returncode == 1 and "db upgrade" in no_schema.stderr
    one_line_error(no_schema)
    assert proc.cli("db", "upgrade").returncode == 0
    engine = db.make_engine(f"sqlite:///{proc.db_path}")
    with db.make_session_factory(engine)() as s:
        s.add(db.Series(series_uid="1.2.3.4", study=db.Study(study_uid="1.2.3"), modality="CT",
                        revision=0, state=db.SeriesState.receiving))  # fmt: skip
        s.commit()
    for args in (("reprocess", "1.2.3.999"), ("resend", "4711"), ("resend", "4711", "--all")):
        missing = proc.cli(*args)
        assert missing.returncode == 3, (args, missing.stderr)
        one_line_error(missing)
    empty = proc.cli("reprocess", "1.2.3.4", "--wait", "5")
    assert empty.returncode == 1, empty.stdout + empty.stderr
    one_line_error(empty)
    with db.make_session_factory(engine)() as s:
        assert s.query(db.Job).count() == 0  # nothing was queued for it
        series = s.query(db.Series).one()
        assert series.state_reason and series.state_reason in empty.stderr
    engine.dispose()
