"""Database trouble, with real processes (issue 10, defect 9).

- Another process holds the SQLite database's write lock (the ``sqlite3`` shell in an open
  ``BEGIN EXCLUSIVE``, for up to 60 s): senders (dcmtk ``storescu``) must get 0xA700 within
  ``database.store_busy_timeout_ms`` and a little, not wait until they time out and abort.
- The database is read-only at start-up: ``dicom-node serve`` must exit at once with one line
  naming ``database.url``, not listen and answer 0xA700 to every store.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from dicom_node import db
from tests.support.node import (
    STORESCU,
    NodeProcess,
    dcmtk_env,
    make_instances,
    parse_storescu_output,
    send_with_storescu,
)
from tests.test_config_errors import (
    _unprivileged,
    assert_one_error_line,
    base_config,
    run_cli,
    shared_dir,  # noqa: F401 - a fixture
)

SQLITE3 = "/usr/bin/sqlite3"
STORE_BUSY_MS = 2000
SLACK_S = 4.0  # process start, association set-up and a loaded 2-core machine
LOCK_HOLD_S = 60


@contextmanager
def write_locked(db_path: Path):
    """The ``sqlite3`` shell holds the database's write lock (``BEGIN EXCLUSIVE``) until the
    block ends, or for ``LOCK_HOLD_S`` at most."""
    if not Path(SQLITE3).exists():
        pytest.skip("no sqlite3 shell")
    shell = subprocess.Popen(
        ["/usr/bin/timeout", str(LOCK_HOLD_S), SQLITE3, str(db_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    shell.stdin.write("BEGIN EXCLUSIVE;\nSELECT 'locked';\n")
    shell.stdin.flush()
    assert shell.stdout.readline().strip() == "locked"  # the lock is held from here on
    try:
        yield
    finally:
        shell.stdin.close()  # the shell exits; its transaction is rolled back
        shell.wait(10)


def timed_storescu(files: list[Path], port: int, log: Path) -> subprocess.Popen:
    """storescu with a 30 s DIMSE timeout, as senders commonly have."""
    cmd = [STORESCU, "-d", "-xv", "-to", "30", "-ta", "30", "-td", "30",
           "-aet", "STORESCU", "-aec", "ACVTT", "127.0.0.1", str(port),
           *map(str, files)]  # fmt: skip
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dcmtk_env())


def test_locked_database_gives_prompt_0xa700(tmp_path, sample_data):
    sources = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))
    files = make_instances(sources, 3, tmp_path / "in", seed="locked-db")
    overrides = {
        "database": {"store_busy_timeout_ms": STORE_BUSY_MS},
        "completion": {"quiet_seconds": 100000},
    }
    with NodeProcess(tmp_path / "node", overrides=overrides) as node:
        with write_locked(node.db_path):
            # Three senders at once: a store queued behind another must not wait longer.
            t0 = time.monotonic()
            senders = [
                timed_storescu([f], node.port, tmp_path / f"storescu{i}.log")
                for i, f in enumerate(files)
            ]
            elapsed = []
            for proc in senders:
                proc.wait(120)
                elapsed.append(time.monotonic() - t0)
        logs = [(tmp_path / f"storescu{i}.log").read_text() for i in range(len(files))]
        for f, log in zip(files, logs, strict=True):
            assert parse_storescu_output(log) == {f: 0xA700}, log
            assert "index write failed: database busy" in log  # the Error Comment says why
        bound = STORE_BUSY_MS / 1000 + SLACK_S
        print(f"seconds to the 0xA700 answers: {[round(e, 2) for e in elapsed]}")
        assert max(elapsed) < bound, elapsed
        assert node.sqlite("select count(*) from instances") == [(0,)]
        # The lock is gone: the senders' retries go through, and the node kept running.
        assert send_with_storescu(files, node.port).acknowledged == set(files)
        assert node.sqlite("select count(*) from instances") == [(3,)]
        assert len(list(node.spool.rglob("*.dcm"))) == 3  # no file left from the failures
        assert node.running


def _serve_fails_at_once(config: Path, reason: str, prefix: list[str] | None = None) -> float:
    """serve exits 2 with one ``error: FILE: database.url: ...`` line; returns its run time."""
    t0 = time.monotonic()
    proc = run_cli("serve", "--config", str(config), prefix=prefix, timeout=60)
    seconds = time.monotonic() - t0
    log = proc.stderr
    assert "listening" not in log  # the receiver never started
    errors = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, log
    assert log.rstrip().endswith(errors[0])  # log lines may come before it, nothing after
    proc.stderr = errors[0] + "\n"
    assert_one_error_line(proc, config, "database.url", reason)
    return seconds


def _make_database(path: Path) -> None:
    db.upgrade(f"sqlite:///{path}")
    db.make_engine(f"sqlite:///{path}").dispose()


def test_read_only_database_url_stops_serve(tmp_path):
    """A database opened read-only (here by its URL): the write tried at start-up fails, and
    serve stops before it listens."""
    db_path = tmp_path / "node.db"
    _make_database(db_path)
    cfg = base_config(tmp_path)
    cfg["database"]["url"] = f"sqlite:///file:{db_path}?mode=ro&uri=true"
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(cfg))
    seconds = _serve_fails_at_once(config, "the database is read-only")
    print(f"serve refused a read-only database in {seconds:.2f} s")


@pytest.mark.parametrize("what", ["file", "directory"])
def test_read_only_database_file_or_directory_stops_serve(shared_dir, what):  # noqa: F811
    """The node's user cannot write the SQLite file, or the directory it lives in (SQLite needs
    to create its -wal and -shm files there). Run as an unprivileged user: root writes anyway."""
    prefix = _unprivileged()
    uid = 65534 if prefix else None
    db_dir = shared_dir / "db"
    db_dir.mkdir()
    db_path = db_dir / "node.db"
    _make_database(db_path)
    spool = shared_dir / "spool"
    spool.mkdir()
    if what == "file":
        db_path.chmod(0o444)
        db_dir.chmod(0o777)
    else:
        db_dir.chmod(0o555)
        if uid is not None:
            shutil.chown(db_path, uid)
    spool.chmod(0o777)
    cfg = base_config(shared_dir)
    cfg["database"]["url"] = f"sqlite:///{db_path}"
    config = shared_dir / "node.yaml"
    config.write_text(yaml.safe_dump(cfg))
    config.chmod(0o644)
    # The test means something only if the user really cannot write there.
    target = db_path if what == "file" else db_dir / "probe"
    probe = subprocess.run([*(prefix or []), "/usr/bin/touch", str(target)], capture_output=True)
    assert probe.returncode != 0, f"the test user can write the {what}: the test is void"

    reason = "SQLite file" if what == "file" else f"directory {db_dir} of the SQLite file"
    seconds = _serve_fails_at_once(config, reason, prefix=prefix)
    print(f"serve refused a read-only database {what} in {seconds:.2f} s")
