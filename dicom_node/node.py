"""The running node: database, receiver and the processing pipeline.

``Node(config).run_forever()`` is what ``dicom-node serve`` runs. Start order: upgrade the
database, start the receiver, then start :class:`dicom_node.scheduler.Pipeline`. SIGTERM/SIGINT
stop it in the reverse order: the pipeline first, then the receiver (which lets open
associations finish for a few seconds).

While it runs, the node keeps a small JSON status file (:func:`status_file_path`) up to date,
rewritten atomically on every association change and every few seconds, so that
``dicom-node status`` and ``dicom-node health`` (other processes) can show the open associations
and the health of every loop. A status file left behind at start-up means the previous run did
not stop cleanly (a crash or ``kill -9``): the pipeline then holds back series that were still
arriving (see scheduler.py). The node also keeps its row in the database's ``nodes`` table up
to date (dicom_node/nodes.py), which ``dicom-node status`` reads to show every node sharing the
database; the status file stays the local channel that works while the database is down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.exc import OperationalError

from dicom_node import db, nodes
from dicom_node.config import NodeConfig
from dicom_node.health import Health
from dicom_node.json_files import replace_json
from dicom_node.receive import Receiver
from dicom_node.receive_pool import ReceiverPool
from dicom_node.scheduler import Pipeline

log = logging.getLogger(__name__)

STATUS_FILE = ".node-status.json"


def status_file_path(config: NodeConfig) -> Path:
    """Where the running node publishes its status (inside the spool, which is writable). With
    ``node.id`` set, the file is the node's own (``.node-status.<id>.json``): nodes that share a
    spool must not read each other's file as their own (a crash would go unnoticed, or a clean
    stop of one would look like a crash of the other)."""
    if config.node.id is None:
        return Path(config.storage.spool_dir) / STATUS_FILE
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", config.node.id)
    return Path(config.storage.spool_dir) / f"{Path(STATUS_FILE).stem}.{safe}.json"


def _check_status(config: NodeConfig) -> tuple[dict | None, str]:
    """(the running node's status, "") or (None, why no node is running for this config).

    A file whose process is gone, or that was not refreshed for three heartbeats, means the
    node died without cleaning up or hangs: it counts as not running.
    """
    try:
        data = json.loads(status_file_path(config).read_text())
    except (OSError, ValueError):
        return None, "node is not running (no status file)"
    pid = data.get("pid")
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return None, "node is not running (it stopped without cleaning up: a crash?)"
    except PermissionError:
        pass  # alive, owned by another user
    age = time.time() - float(data.get("updated_unix", 0))
    if age > nodes.HEARTBEATS_UNTIL_STALE * config.node.heartbeat_s:
        return None, (
            f"node process {pid} is alive but has not updated its status for "
            f"{age:.0f} s (is the spool's disk full, or the process hung?)"
        )
    return data, ""


def status_problem(config: NodeConfig) -> str:
    """Why :func:`read_status` found no running node, in words for a health check."""
    return _check_status(config)[1] or "node is running"


def read_status(config: NodeConfig) -> dict | None:
    """The running node's status, or None when no node is running for this config."""
    return _check_status(config)[0]


class StartupError(Exception):
    """The node cannot start as configured: ``key`` is the config key to look at, ``reason``
    one line saying why."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class Node:
    """Composes the node's parts; see the module docstring for start/stop order."""

    def __init__(self, config: NodeConfig):
        self.config = config
        self.engine = None
        self.session_factory = None
        self._store_engine = None
        self._store_sessions = None
        self.receiver: Receiver | None = None
        self.receiver_pool: ReceiverPool | None = None  # node.receiver_processes > 1
        self.pipeline: Pipeline | None = None
        self.http = None  # dicom_node.web.server.HttpServer when http.enabled
        self._web_engine = None
        self.health = Health(stall_after_s=config.node.health_stall_after_s)
        self.started = datetime.now(UTC)
        self._stop = threading.Event()
        self._status_dirty = threading.Event()
        self._status_thread: threading.Thread | None = None
        self.presence: nodes.Presence | None = None  # this process's row in the nodes table

    def start(self) -> None:
        cfg = self.config
        self._open_database()
        # Read before this run writes its own: a file left behind means the last run crashed.
        crashed = status_file_path(cfg).exists()
        if cfg.http.enabled:
            self._bind_http()  # a port in use stops the start before anything else listens
        if cfg.node.role != "worker":  # a worker only claims and runs jobs: no DICOM port
            self.receiver = Receiver(cfg, self._store_sessions, on_change=self._status_dirty.set)
            self.receiver.start()
            if cfg.node.receiver_processes > 1:  # more receiving processes on the same port
                level = logging.getLogger().getEffectiveLevel()
                self.receiver_pool = ReceiverPool(
                    cfg, self.receiver.port, level, self.health, listen_fd=self.receiver.listen_fd
                )
                self.receiver_pool.start()
        self.pipeline = Pipeline(
            cfg, self.session_factory, previous_run_crashed=crashed, health=self.health
        )
        self.pipeline.start()
        if self.http is not None:
            self.http.view.models = self.pipeline.models  # readiness and reprocess use it
            if self.receiver is not None:
                self.http.view.store_part10 = self.receiver.store_part10  # STOW-RS
            if self.receiver_pool is not None:
                self.http.view.receiver_metrics_dir = self.receiver_pool.metrics_dir
            self.http.start()
        self.presence = nodes.Presence(
            cfg,
            self.session_factory,
            port=self.receiver.port if self.receiver else None,
            loaded_model=lambda: self.pipeline.models.loaded if self.pipeline else None,
        )
        self.presence.register()
        self._write_status()
        self._status_thread = threading.Thread(
            target=self._status_loop, name="node-status", daemon=True
        )
        self._status_thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.pipeline is not None:
            try:
                self.pipeline.shutdown()
            except Exception:
                log.exception("pipeline shutdown failed")
            self.pipeline = None
        if self.receiver_pool is not None:  # SIGTERM: each lets its associations finish
            self.receiver_pool.stop()
        if self.receiver is not None:
            self.receiver.stop()
        self._status_dirty.set()
        if self._status_thread is not None:
            self._status_thread.join(timeout=5)
        if self.presence is not None:
            self.presence.stop()
        if self.http is not None:  # last: /readyz says "shutting down" until here
            self.http.stop()
            self.http = None
        if self._web_engine is not None:
            self._web_engine.dispose()
        with contextlib.suppress(OSError):
            status_file_path(self.config).unlink(missing_ok=True)
        for engine in (self.engine, self._store_engine):
            if engine is not None:
                engine.dispose()

    def _open_database(self) -> None:
        """Bring the schema up to date and prove that the database takes a write, before
        anything listens: a read-only database stops the start (:class:`StartupError`) instead
        of a node that answers every store with 0xA700."""
        cfg = self.config.database
        try:
            db.upgrade(cfg.url)
            self.engine = db.make_engine(cfg.url, cfg.busy_timeout_ms)
            db.check_writable(self.engine)
        except OperationalError as exc:
            reason = db.unwritable_reason(exc)
            if reason is None:
                raise
            raise StartupError("database.url", reason) from exc
        self.session_factory = db.make_session_factory(self.engine)
        # The receiver's own engine and busy timeout: a sender waits for each answer, the
        # pipeline can wait longer (busy_timeout_ms).
        self._store_engine = db.make_engine(cfg.url, cfg.store_busy_timeout_ms)
        self._store_sessions = db.make_session_factory(self._store_engine)

    def _bind_http(self) -> None:
        """Build the HTTP side (dicom_node.web) on its own database engine and open its port."""
        # Imported here: Starlette, uvicorn and Jinja2 (about 0.3 s) load only when http.enabled.
        from dicom_node.web import HttpBindError
        from dicom_node.web.context import NodeView
        from dicom_node.web.server import HttpServer

        cfg = self.config
        self._web_engine = db.make_engine(cfg.database.url, cfg.database.busy_timeout_ms)
        view = NodeView(
            config=cfg,
            sessions=db.make_session_factory(self._web_engine),
            started=self.started,
            associations=self._association_dicts,
            receiver_listening=lambda: self.receiver is not None and self.receiver.listening,
            models=None,  # the pipeline's, once it exists (start)
            health=self.health.snapshot,
            stopping=self._stop.is_set,
            runs_jobs=cfg.node.role != "receiver",
        )
        self.http = HttpServer(view)
        try:
            self.http.bind()
        except OSError as exc:
            where = f"{cfg.http.bind_address}:{cfg.http.port}"
            raise HttpBindError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from exc

    def _association_dicts(self) -> list[dict]:
        """Every open association of this node: the main process's receiver's and those of
        its additional receiving processes (``node.receiver_processes``), each with the
        ``pid`` of the process serving it."""
        if self.receiver is None:
            return []
        pid = os.getpid()
        own = [{**a.as_dict(), "pid": pid} for a in self.receiver.active_associations()]
        return own + (self.receiver_pool.associations() if self.receiver_pool else [])

    def run_forever(self) -> None:
        """Start, block until SIGTERM/SIGINT, then stop cleanly."""

        def _signal(signum, _frame):
            log.info("signal %s: shutting down", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    # -- status file ---------------------------------------------------------------------------
    def status(self) -> dict:
        return {
            "pid": os.getpid(),
            "ae_title": self.config.node.ae_title,
            "address": self.config.node.bind_address,
            "port": self.receiver.port if self.receiver else self.config.node.port,
            "started": self.started.isoformat(timespec="seconds"),
            "updated_unix": time.time(),
            "pipeline": self.pipeline is not None,
            "health": self.health.snapshot(),
            "associations": self._association_dicts(),
        }

    def _write_status(self) -> None:
        path = status_file_path(self.config)
        try:
            replace_json(path, self.status())
        except OSError as exc:
            log.warning("cannot write status file %s: %s", path, exc.strerror)

    def _status_loop(self) -> None:
        while not self._stop.is_set():
            self._status_dirty.wait(self.config.node.heartbeat_s)
            self._status_dirty.clear()
            if self._stop.is_set():
                break
            self._write_status()
            if self.presence is not None:
                self.presence.beat()  # never blocks: the file stays fresh if the database hangs
            time.sleep(0.2)  # coalesce bursts of association changes
