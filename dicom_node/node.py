"""The running node: database, receiver and (when installed) the processing pipeline.

``Node(config).run_forever()`` is what ``dicom-node serve`` runs. Start order: upgrade the
database, start the receiver, then start :class:`dicom_node.scheduler.Pipeline` if that module
exists. SIGTERM/SIGINT stop it in the reverse order: the pipeline first, then the receiver
(which lets open associations finish for a few seconds).

While it runs, the node keeps a small JSON status file (:func:`status_file_path`) up to date,
rewritten atomically on every association change and every few seconds, so that
``dicom-node status`` (another process) can show the open associations.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from dicom_node import db
from dicom_node.config import NodeConfig
from dicom_node.receive import Receiver

log = logging.getLogger(__name__)

STATUS_FILE = ".node-status.json"
HEARTBEAT_S = 5.0


def status_file_path(config: NodeConfig) -> Path:
    """Where the running node publishes its status (inside the spool, which is writable)."""
    return Path(config.storage.spool_dir) / STATUS_FILE


def read_status(config: NodeConfig) -> dict | None:
    """The running node's status, or None when no node is running for this config.

    A file whose process is gone, or that was not refreshed for three heartbeats, means the
    node died without cleaning up: it counts as not running.
    """
    try:
        data = json.loads(status_file_path(config).read_text())
    except (OSError, ValueError):
        return None
    pid = data.get("pid")
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return None
    except PermissionError:
        pass  # alive, owned by another user
    if time.time() - float(data.get("updated_unix", 0)) > 3 * HEARTBEAT_S:
        return None
    return data


class Node:
    """Composes the node's parts; see the module docstring for start/stop order."""

    def __init__(self, config: NodeConfig):
        self.config = config
        self.engine = None
        self.session_factory = None
        self.receiver: Receiver | None = None
        self.pipeline = None
        self.started = datetime.now(UTC)
        self._stop = threading.Event()
        self._status_dirty = threading.Event()
        self._status_thread: threading.Thread | None = None

    def start(self) -> None:
        cfg = self.config
        db.upgrade(cfg.database.url)
        self.engine = db.make_engine(cfg.database.url, cfg.database.busy_timeout_ms)
        self.session_factory = db.make_session_factory(self.engine)
        self.receiver = Receiver(cfg, self.session_factory, on_change=self._status_dirty.set)
        self.receiver.start()
        pipeline_cls = _optional_pipeline()
        if pipeline_cls is not None:
            self.pipeline = pipeline_cls(cfg, self.session_factory)
            self.pipeline.start()
            log.info("pipeline started")
        else:
            log.info("no dicom_node.scheduler module: receiving only")
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
        if self.receiver is not None:
            self.receiver.stop()
        self._status_dirty.set()
        if self._status_thread is not None:
            self._status_thread.join(timeout=5)
        with contextlib.suppress(OSError):
            status_file_path(self.config).unlink(missing_ok=True)
        if self.engine is not None:
            self.engine.dispose()

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
        assocs = self.receiver.active_associations() if self.receiver else []
        return {
            "pid": os.getpid(),
            "ae_title": self.config.node.ae_title,
            "address": self.config.node.bind_address,
            "port": self.receiver.port if self.receiver else self.config.node.port,
            "started": self.started.isoformat(timespec="seconds"),
            "updated_unix": time.time(),
            "pipeline": self.pipeline is not None,
            "associations": [a.as_dict() for a in assocs],
        }

    def _write_status(self) -> None:
        path = status_file_path(self.config)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.status()))
            os.replace(tmp, path)  # readers see the old or the new file, never half of one
        except OSError as exc:
            log.warning("cannot write status file %s: %s", path, exc.strerror)

    def _status_loop(self) -> None:
        while not self._stop.is_set():
            self._status_dirty.wait(HEARTBEAT_S)
            self._status_dirty.clear()
            if self._stop.is_set():
                break
            self._write_status()
            time.sleep(0.2)  # coalesce bursts of association changes


def _optional_pipeline():
    try:
        module = importlib.import_module("dicom_node.scheduler")
    except ModuleNotFoundError as exc:
        if exc.name == "dicom_node.scheduler":
            return None
        raise
    return getattr(module, "Pipeline", None)
