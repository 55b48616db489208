"""``/readyz`` follows the real causes and comes back when they go (issue 11).

A real node runs with its spool on a small tmpfs (a real file system that the test can fill) and
``storage.min_free_bytes`` of 24 MB. Filling the file system below the minimum turns ``/readyz``
503 with the disk reason (and ``dicom_node_ready`` 0); removing the filler turns it 200 again.
Then another process (the ``sqlite3`` shell, ``BEGIN EXCLUSIVE``) holds the database: 503 with
the database reason; when it lets go, 200 again. A database file that is gone (moved away) is
checked in-process with the same readiness code, so the running node's files are never moved.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dicom_node import db
from dicom_node.config import parse_config
from dicom_node.web.context import NodeView
from tests.support.fs import fill, tmpfs
from tests.support.http import Web, http_overrides
from tests.support.node import NodeProcess
from tests.support.polling import wait_until

SQLITE3 = "/usr/bin/sqlite3"
MIN_FREE = 24 * 1024 * 1024


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MB tmpfs for the spool."""
    with tmpfs(tmp_path / "fs", 64) as mnt:
        yield mnt


def _reasons(web: Web) -> tuple[int, list[str]]:
    r = web.get("/readyz")
    return r.status_code, r.json()["reasons"]


def _metric(web: Web, name: str) -> float:
    for line in web.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_readyz_follows_disk_and_database(small_fs, tmp_path):
    if not Path(SQLITE3).exists():
        pytest.skip("no sqlite3 shell")
    overrides = {
        **http_overrides(),
        "storage": {"spool_dir": str(small_fs / "spool"), "min_free_bytes": MIN_FREE},
    }
    with NodeProcess(tmp_path / "node", overrides=overrides) as node:
        web = Web(node)
        body = web.wait_ready()
        assert set(body["checks"]) == {"database", "spool", "disk", "receiver", "model"}
        assert _metric(web, "dicom_node_ready") == 1.0

        filler = fill(small_fs, keep_free=MIN_FREE // 2)
        status, reasons = _reasons(web)
        assert status == 503
        assert reasons == [reasons[0]] and reasons[0].startswith(
            "disk: free space below the minimum"
        ), reasons
        assert _metric(web, "dicom_node_ready") == 0.0
        filler.unlink()
        assert _reasons(web) == (200, [])

        locker = subprocess.Popen(
            ["/usr/bin/timeout", "120", SQLITE3, str(node.db_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            locker.stdin.write("BEGIN EXCLUSIVE;\nSELECT 'locked';\n")
            locker.stdin.flush()
            assert locker.stdout.readline().strip() == "locked"
            status, reasons = _reasons(web)
            assert status == 503
            assert len(reasons) == 1 and reasons[0].startswith("database: cannot use"), reasons
            assert "locked" in reasons[0]
        finally:
            locker.stdin.close()
            locker.wait(10)
        wait_until(lambda: _reasons(web) == (200, []), 30, "/readyz to be 200 again")
        # Each failing check was its own reason, and the node kept running throughout.
        assert node.running, node.log_tail()


def test_readiness_database_file_gone(tmp_path):
    """The probe uses a new connection that never creates the file: a database moved away is
    reported (not replaced by an empty one) and is fine again once it is back."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    db.upgrade(url)
    (tmp_path / "spool").mkdir()
    config = parse_config(
        {"storage": {"spool_dir": str(tmp_path / "spool"), "min_free_bytes": 0},
         "database": {"url": url}}
    )  # fmt: skip
    view = NodeView(
        config=config,
        sessions=db.make_session_factory(db.make_engine(url)),
        started=datetime.now(UTC),
        receiver_listening=lambda: True,
        runs_jobs=False,
    )
    try:
        assert view.readiness().ok
        (tmp_path / "node.db").rename(tmp_path / "moved.db")
        ready = view.readiness().as_dict()
        assert not ready["ready"]
        assert ready["reasons"][0].startswith("database: cannot use the database: unable to open")
        assert not (tmp_path / "node.db").exists()
        (tmp_path / "moved.db").rename(tmp_path / "node.db")
        assert view.readiness().ok
    finally:
        view.close()
