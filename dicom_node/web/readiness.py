"""What ``/readyz`` checks: can this node take a series and do its work right now?

Each check gives a :class:`Check` with a reason in words, all of them run every time (a
monitoring person wants every cause at once, not the first):

* **database**: a new connection reads the schema version and takes the write lock (the write
  is rolled back). A new connection, not a pooled one: a file moved away, a directory made
  unreadable or another process holding the lock show up here even while pooled connections
  still work. SQLite is opened read-write without *create*, so a missing file is reported,
  never replaced by an empty one.
* **spool**: a file can be created and removed in ``storage.spool_dir``;
* **disk**: free space on the spool's file system is at least ``storage.min_free_bytes`` (below
  it the receiver refuses associations);
* **receiver**: the DICOM port is listening;
* **model**: the model is loaded, when the process runs jobs (it loads at start-up; until then
  the node is not ready);
* **node**: the node is not shutting down.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

from dicom_node.config import sqlite_path

if TYPE_CHECKING:
    from dicom_node.web.context import NodeView

__all__ = ["Check", "Readiness", "check_readiness", "probe_engine"]

PROBE_TIMEOUT_S = 2.0  # a write lock held longer than this by someone else counts as unusable


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Readiness:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict:
        """``{"ready": bool, "reasons": [...], "checks": {name: {"ok", "detail"}}}``."""
        return {
            "ready": self.ok,
            "reasons": [f"{c.name}: {c.detail}" for c in self.checks if not c.ok],
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in self.checks},
        }


def probe_engine(url: str) -> Engine:
    """An engine whose every connection is new (no pool), with a short lock timeout."""
    path = sqlite_path(url)
    if path is None and make_url(url).get_backend_name() == "postgresql":
        # A server that does not answer, or a lock held by another client, fails the probe
        # within the probe timeout instead of holding /readyz.
        ms = int(PROBE_TIMEOUT_S * 1000)
        args = {
            "connect_timeout": max(2, round(PROBE_TIMEOUT_S)),
            "options": f"-c lock_timeout={ms}",
        }
        return create_engine(url, poolclass=NullPool, connect_args=args)
    if path is None:
        return create_engine(url, poolclass=NullPool)
    uri = f"file:{quote(str(path.absolute()))}?mode=rw"  # rw without c: never create the file

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, timeout=PROBE_TIMEOUT_S, check_same_thread=False)

    return create_engine("sqlite://", creator=connect, poolclass=NullPool)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).splitlines() or [type(orig).__name__])[0][:200]


def check_database(engine: Engine) -> Check:
    try:
        with engine.connect() as conn:
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            conn.execute(text("UPDATE alembic_version SET version_num = version_num"))
            conn.rollback()
    except Exception as exc:
        return Check("database", False, f"cannot use the database: {_first_line(exc)}")
    return Check("database", True, f"reachable and writable (schema {version})")


def check_spool(spool: Path) -> Check:
    try:
        fd, probe = tempfile.mkstemp(prefix=".ready-probe-", dir=spool)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return Check("spool", False, f"cannot write in {spool}: {exc.strerror or exc}")
    return Check("spool", True, f"{spool} is writable")


def check_disk(spool: Path, min_free: int) -> Check:
    try:
        free = shutil.disk_usage(spool).free
    except OSError as exc:
        return Check("disk", False, f"cannot read free space of {spool}: {exc.strerror or exc}")
    words = f"{free / 1e9:.2f} GB free, minimum {min_free / 1e9:.2f} GB (storage.min_free_bytes)"
    if free < min_free:
        return Check("disk", False, f"free space below the minimum: {words}")
    return Check("disk", True, words)


def check_readiness(view: NodeView, engine: Engine) -> Readiness:
    cfg = view.config
    spool = Path(cfg.storage.spool_dir)
    checks = [
        check_database(engine),
        check_spool(spool),
        check_disk(spool, cfg.storage.min_free_bytes),
    ]
    listening = False
    with contextlib.suppress(Exception):
        listening = bool(view.receiver_listening())
    port = f"{cfg.node.bind_address}:{cfg.node.port}"
    if cfg.node.role != "worker":  # a worker has no DICOM port
        checks.append(
            Check("receiver", True, f"listening on {port}")
            if listening
            else Check("receiver", False, f"not listening on {port}")
        )
    if view.runs_jobs:
        model = view.model_status()
        if model.loaded:
            checks.append(Check("model", True, f"{model.model_id} {model.model_version} loaded"))
        elif model.error:
            checks.append(Check("model", False, f"cannot be loaded: {model.error}"))
        else:
            checks.append(Check("model", False, "not loaded yet (loading at start-up)"))
    if view.stopping():
        checks.append(Check("node", False, "shutting down"))
    return Readiness(tuple(checks))
