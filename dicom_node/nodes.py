"""The nodes that share a database: each node process's row in the ``nodes`` table.

A running node (:class:`dicom_node.node.Node`) keeps its row up to date through
:class:`Presence`: :meth:`~Presence.register` at start (a restart with the same ``node.id``
reuses the row), :meth:`~Presence.beat` from the node's status loop every
``node.heartbeat_s`` (``last_seen``, and the model and devices once a model is loaded), and
:meth:`~Presence.stop` at a clean stop (``stopped_at``). :func:`list_nodes` reads every row with
its state for ``dicom-node status``, the JSON API and ``/metrics``:

* ``alive``: seen within three of its heartbeats;
* ``stale``: not seen for longer and never stopped: it crashed (``kill -9``, power cut), hangs,
  or cannot reach the database;
* ``stopped``: it stopped cleanly.

The times are each node's own clock (naive UTC, as everywhere in the database), like the job
leases: keep the clocks of the nodes in sync (NTP).

The per-process status file (:func:`dicom_node.node.status_file_path`) stays as it is: it is the
local channel that still works while the database is down (``dicom-node health`` reads it), and
a file left behind at start is how a node learns that its previous run crashed. A database write
that fails here is logged as a warning and never stops the node.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.db import NodeRow, utcnow

__all__ = ["NODE_STATES", "Presence", "list_nodes", "node_state", "nodes_by_state"]

log = logging.getLogger(__name__)

NODE_STATES = ("alive", "stale", "stopped")
HEARTBEATS_UNTIL_STALE = 3  # as for the status file: one or two late beats are not a crash


class LoadedModel(Protocol):
    model_id: str
    model_version: str


def node_version() -> str:
    """The package version, with the git commit when running from a git checkout."""
    try:
        version = metadata.version("acvtt-node")
    except metadata.PackageNotFoundError:
        version = "unknown"
    repo = Path(__file__).resolve().parent.parent
    if (repo / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        if commit:
            version = f"{version}+g{commit}"
    return version[:64]


def loaded_devices(device: str) -> str:
    """What the loaded model runs on: ``cpu (2 threads)`` (torch's CPU threads in this process,
    ``model.torch_threads``), or the CUDA GPUs (``cuda:0 NVIDIA H100``); call only once a model
    is loaded (torch is then imported)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return "cpu"
    try:
        threads = int(torch.get_num_threads())
        cpu = f"cpu ({threads} thread{'' if threads == 1 else 's'})"
        if device == "cpu" or not torch.cuda.is_available():
            return cpu
        gpus = range(torch.cuda.device_count())
        if device.startswith("cuda:"):
            gpus = [int(device.split(":", 1)[1])]
        names = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in gpus]
    except Exception as exc:  # a broken CUDA set-up must not stop the heartbeat
        return f"{device} ({type(exc).__name__})"
    return ", ".join(names)[:255]


@dataclass(frozen=True)
class NodeFacts:
    """What a node says about itself at start."""

    id: str
    host: str
    role: str
    version: str
    pid: int
    ae_title: str
    port: int | None
    heartbeat_s: float

    @classmethod
    def of(cls, config: NodeConfig, port: int | None) -> NodeFacts:
        node = config.node
        return cls(
            id=node.node_id,  # the name its job claims carry
            host=socket.gethostname()[:255],
            role=node.role,
            version=node_version(),
            pid=os.getpid(),
            ae_title=node.ae_title,
            port=port if node.role != "worker" else None,
            heartbeat_s=node.heartbeat_s,
        )


def register(session: Session, facts: NodeFacts, now: datetime | None = None) -> None:
    """Insert or renew ``facts.id``'s row as just started. The caller commits."""
    now = now or utcnow()
    row = session.get(NodeRow, facts.id)
    if row is None:
        row = NodeRow(id=facts.id)
        session.add(row)
    elif row.stopped_at is None and node_state(row, now) == "alive" and row.pid != facts.pid:
        log.warning(
            "node.id %s is already alive in the nodes table (pid %s on %s, seen %.0f s ago): "
            "two processes with one node.id?",
            facts.id,
            row.pid,
            row.host,
            (now - row.last_seen).total_seconds(),
        )
    for name in ("host", "role", "version", "pid", "ae_title", "port", "heartbeat_s"):
        setattr(row, name, getattr(facts, name))
    row.model_id = row.model_version = row.devices = None  # until this run loads one
    row.started_at = row.last_seen = now
    row.stopped_at = None


def heartbeat(
    session: Session,
    node_id: str,
    model: LoadedModel | None = None,
    devices: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Renew ``last_seen`` (and the model fields once known); False when the node has no row
    or is marked stopped. The caller commits."""
    values: dict[str, object] = {"last_seen": now or utcnow()}
    if model is not None:
        values |= {
            "model_id": str(model.model_id)[:64],
            "model_version": str(model.model_version)[:64],
            "devices": devices,
        }
    done = session.execute(
        update(NodeRow)
        .where(NodeRow.id == node_id, NodeRow.stopped_at.is_(None))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return done.rowcount > 0


def mark_stopped(session: Session, node_id: str, now: datetime | None = None) -> None:
    """Record a clean stop. The caller commits."""
    now = now or utcnow()
    session.execute(
        update(NodeRow)
        .where(NodeRow.id == node_id)
        .values(last_seen=now, stopped_at=now)
        .execution_options(synchronize_session=False)
    )


def node_state(row: NodeRow, now: datetime | None = None) -> str:
    """``alive``, ``stale`` or ``stopped`` (see the module docstring)."""
    if row.stopped_at is not None:
        return "stopped"
    age = ((now or utcnow()) - row.last_seen).total_seconds()
    return "alive" if age <= HEARTBEATS_UNTIL_STALE * row.heartbeat_s else "stale"


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat(timespec="seconds") + "Z"


def list_nodes(session: Session, now: datetime | None = None) -> list[dict]:
    """Every node row with its state, as JSON-ready values (times ISO 8601 UTC), by id."""
    now = now or utcnow()
    out = []
    for row in session.scalars(select(NodeRow).order_by(NodeRow.id)):
        out.append(
            {
                "id": row.id,
                "role": row.role,
                "host": row.host,
                "state": node_state(row, now),
                "last_seen": _iso(row.last_seen),
                "last_seen_age_s": round((now - row.last_seen).total_seconds(), 1),
                "started_at": _iso(row.started_at),
                "stopped_at": _iso(row.stopped_at),
                "pid": row.pid,
                "ae_title": row.ae_title,
                "port": row.port,
                "version": row.version,
                "model_id": row.model_id,
                "model_version": row.model_version,
                "devices": row.devices,
                "heartbeat_s": row.heartbeat_s,
            }
        )
    return out


def nodes_by_state(session: Session, now: datetime | None = None) -> dict[str, int]:
    """``{state: count}`` with every state present (0 when none)."""
    counts = dict.fromkeys(NODE_STATES, 0)
    for node in list_nodes(session, now):
        counts[node["state"]] += 1
    return counts


class Presence:
    """This process's row, kept up to date by the running node.

    :meth:`beat` never blocks its caller (the status loop, which must keep the status file
    fresh while the database hangs): the write runs on a thread of its own, at most one at a
    time. Every failed write is a warning in the log, nothing more; the next beat tries again
    (and registers the row again if it is gone).
    """

    def __init__(
        self,
        config: NodeConfig,
        sessions: sessionmaker[Session],
        port: int | None,
        loaded_model=lambda: None,
    ):
        self.facts = NodeFacts.of(config, port)
        self.device = config.model.device
        self.sessions = sessions
        self.loaded_model = loaded_model  # () -> the loaded model's identity, or None
        self._devices: str | None = None
        self._writing = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def _write(self, what: str, fn) -> bool:
        try:
            with self.sessions() as s:
                result = fn(s)
                s.commit()
            return result is not False
        except Exception as exc:
            log.warning("cannot %s node %s in the nodes table: %s", what, self.facts.id, exc)
            return True  # a failed write is not a missing row: do not register again

    def register(self) -> None:
        self._write("register", lambda s: register(s, self.facts))

    def _beat_now(self) -> None:
        try:
            model = self.loaded_model()
            if model is not None and self._devices is None:
                self._devices = loaded_devices(self.device)
            if not self._write(
                "renew", lambda s: heartbeat(s, self.facts.id, model, self._devices)
            ):
                # The row was removed (or marked stopped) behind the running node's back.
                self._write("register", lambda s: register(s, self.facts))
        finally:
            self._writing.release()

    def beat(self) -> None:
        """Renew this node's row in the background; skipped while the last write still runs."""
        if self._stopped or not self._writing.acquire(blocking=False):
            return
        self._thread = threading.Thread(target=self._beat_now, name="nodes-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Mark this node stopped (after a last running beat, if any, has finished)."""
        self._stopped = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._write("mark stopped", lambda s: mark_stopped(s, self.facts.id))
