"""A private, throw-away PostgreSQL cluster for tests (Debian's ``postgresql`` binaries).

Example::

    from tests.support.postgres import PostgresCluster

    with PostgresCluster(tmp_path / "pg") as pg:
        url = pg.create_database()   # postgresql+psycopg://postgres@127.0.0.1:PORT/t1

``initdb`` writes the cluster into a temporary directory, owned by an unprivileged user when
the tests run as root (PostgreSQL refuses to run as root): ``nobody``. The server listens on
127.0.0.1 and a free port only, with its unix socket in the same temporary directory, and trusts
every local connection (nothing else can reach it). It runs with ``fsync=off``: a test cluster
never outlives its run, and the durability settings of a real one are not what the tests check.
``stop()`` stops the server (``pg_ctl stop -m fast``) and removes the directory;
``stop_server()`` and ``start_server()`` take the server away and bring it back on the same port
(a database outage). Nothing here uses or needs a system-wide PostgreSQL service.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.dcmtk import free_port

UNPRIVILEGED_USER = "nobody"
DATABASE_KINDS = ["sqlite", "postgresql"]
# A test decorated with this runs once on each engine (the ``database_url`` fixture in
# tests/conftest.py follows ``db_kind``).
both_databases = pytest.mark.parametrize("db_kind", DATABASE_KINDS, indirect=True)


def pg_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` that has ``initdb``, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    return Path(found[-1]).parent if found else None


class PostgresCluster:
    """One ``postgres`` server on loopback, for the length of a test run (see module docstring)."""

    def __init__(self, work_dir: Path | str | None = None) -> None:
        bindir = pg_bin_dir()
        if bindir is None:
            raise FileNotFoundError("no /usr/lib/postgresql/*/bin/initdb (scripts/setup.sh)")
        self.bindir = bindir
        self._own_dir = work_dir is None
        self.root = Path(work_dir or tempfile.mkdtemp(prefix="pgtest-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._started = False
        self._names = itertools.count(1)

    # -- running as an unprivileged user -----------------------------------------------------
    def _as_user(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        return ["runuser", "-u", UNPRIVILEGED_USER, "--", *argv]

    def _give_to_user(self) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> PostgresCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self._give_to_user()
        subprocess.run(
            self._as_user(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
            cwd=self.root,
        )
        return self.start_server()

    def start_server(self) -> PostgresCluster:
        """Start the server on the existing cluster (same port and data)."""
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.root}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        started = subprocess.run(
            self._as_user(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.root / "postgres.log"),
                    "-o",
                    f"-p {self.port} {options}",
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            capture_output=True,
            cwd=self.root,
        )
        self._started = True  # stop() also cleans up after a half-started server
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {started.stderr!r}\n{self.log_tail()}")
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if ok.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"postgres did not start in {timeout} s: {self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join((self.root / "postgres.log").read_text().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop_server(self) -> None:
        """Stop the server and keep the cluster (``start_server`` brings it back)."""
        if self._started:
            # fast: ends open client connections (a test may leave a pooled one behind)
            subprocess.run(
                self._as_user(
                    [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]
                ),
                capture_output=True,
                cwd=self.root,
                timeout=60,
            )
            self._started = False

    def stop(self) -> None:
        """Stop the server and remove the cluster."""
        self.stop_server()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- databases ---------------------------------------------------------------------------
    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE need that)."""
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname=database, autocommit=True
        ) as conn:
            conn.execute(statement)

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        name = f"t{next(self._names)}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)
