"""More receiving processes on one host: ``node.receiver_processes: N``.

One Python process receives at the speed of one interpreter (the GIL), whatever the number of
cores. With N > 1, ``dicom-node serve`` (roles ``all`` and ``receiver``) keeps its own
:class:`~dicom_node.receive.Receiver` and starts N - 1 more processes
(``python -m dicom_node.receive_pool``), each running only a Receiver on its own database
engine: no pipeline, no HTTP side, no status file. The main process's listening socket is
passed down to each of them (``pass_fds``), and every process accepts on it, so a new
connection goes to whichever process takes it first: one that is free. Each process stores
through the same code path as the main one: 0x0000 still means that the file is fsync'd in
place and its index row committed.

:class:`ReceiverPool` (in the main process) supervises them from one thread, which also starts
every child (Linux's parent-death signal follows the thread that forked):

* a child that exits is started again, after 1 s, doubling up to 30 s while it keeps dying
  within a minute of its start; the node's health shows ``receiver-processes`` as failing
  meanwhile;
* :meth:`ReceiverPool.stop` sends SIGTERM; each child stops accepting and gives its open
  associations the same grace period as the main receiver, then exits; any child still there
  after that gets SIGKILL;
* a child whose parent dies (even by SIGKILL) gets SIGTERM from the kernel
  (``PR_SET_PDEATHSIG``) and also notices within a second that its parent changed.

A connection waiting in the accept queue of a child that dies is reset by the kernel (the
sender sees a failed association and retries); associations already accepted by other
processes are not affected.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import NodeConfig
from dicom_node.health import Health
from dicom_node.json_files import replace_json
from dicom_node.web.metrics import CHILDREN_DIR_ENV

log = logging.getLogger("dicom_node.receive_pool")  # also when run as __main__

HEALTH_LOOP = "receiver-processes"
POLL_S = 0.5
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0  # a child that ran this long starts again after FIRST_BACKOFF_S
KILL_MARGIN_S = 5.0  # beyond the children's own grace period, before SIGKILL
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class _Slot:
    """One additional receiving process, alive or waiting to be started again."""

    index: int
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    backoff_s: float = FIRST_BACKOFF_S


class ReceiverPool:
    """Starts and supervises ``node.receiver_processes - 1`` receiving processes that listen
    on ``port`` beside the main process's receiver (which must be listening already)."""

    def __init__(
        self,
        config: NodeConfig,
        port: int,
        log_level: int,
        health: Health | None = None,
        listen_fd: int | None = None,
    ):
        # The children listen where the main receiver does, also when the config said port 0.
        node = config.node.model_copy(update={"port": port})
        self._config_json = config.model_copy(update={"node": node}).model_dump_json()
        self._log_level = log_level
        self._health = health
        self._listen_fd = listen_fd  # the main receiver's listening socket, shared
        self._slots = [_Slot(i) for i in range(1, config.node.receiver_processes)]
        # The children count their instruments (stores, associations) into files here, which
        # the main process's /metrics adds in (dicom_node.web.metrics.instruments).
        self.metrics_dir: str | None = None
        self._stop = threading.Event()
        self._grace_s = 10.0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the children (from the supervising thread) and return once they are forked."""
        if self._health is not None:
            self._health.register(HEALTH_LOOP, POLL_S)
        self.metrics_dir = tempfile.mkdtemp(prefix="dicom-node-receivers-")
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="receiver-pool", daemon=True
        )
        self._thread.start()
        started.wait(30)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every child; wait for them (each lets its associations finish within
        ``grace_s``), then SIGKILL what is left."""
        self._grace_s = grace_s
        self._stop.set()
        if self._thread is not None:
            self._thread.join(grace_s + 2 * KILL_MARGIN_S)
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def pids(self) -> list[int]:
        """The process ids of the children running now."""
        with self._lock:
            return [s.proc.pid for s in self._slots if s.proc is not None]

    def associations(self) -> list[dict]:
        """The open associations of the children running now, as each last published them
        (:func:`publish_associations`: on every open and close, and every second), each with
        its process's ``pid``. A child's file from before its restart is ignored."""
        if self.metrics_dir is None:
            return []
        out: list[dict] = []
        with self._lock:
            running = {s.index: s.proc.pid for s in self._slots if s.proc is not None}
        for index, pid in running.items():
            try:
                published = json.loads((Path(self.metrics_dir) / _assoc_file(index)).read_text())
            except (OSError, ValueError):
                continue  # not published yet, or being replaced (rename: never half a file)
            if published.get("pid") == pid:
                out += [{**a, "pid": pid} for a in published.get("associations", [])]
        return out

    # -- the supervising thread ----------------------------------------------------------------
    def _run(self, started: threading.Event) -> None:
        try:
            for slot in self._slots:
                self._spawn(slot)
            started.set()
            while not self._stop.wait(POLL_S):
                self._supervise()
        except Exception:  # children then get SIGTERM from the kernel (the thread ends)
            log.exception("receiver pool supervisor failed")
        finally:
            started.set()
            self._terminate_all()

    def _supervise(self) -> None:
        now = time.monotonic()
        down = 0
        for slot in self._slots:
            if slot.proc is not None and slot.proc.poll() is not None:
                self._exited(slot, now)
            if slot.proc is None and now >= slot.restart_at:
                self._spawn(slot)
            down += slot.proc is None
        if self._health is not None:
            if down:
                self._health.failed(HEALTH_LOOP, f"{down} receiver process(es) down, restarting")
            else:
                self._health.ok(HEALTH_LOOP)

    def _exited(self, slot: _Slot, now: float) -> None:
        assert slot.proc is not None
        rc, pid = slot.proc.returncode, slot.proc.pid
        if now - slot.started_at >= STABLE_AFTER_S:
            slot.backoff_s = FIRST_BACKOFF_S
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        log.error(
            "receiver process %d pid=%d ended (%s) after %.0f s; starting it again in %.0f s",
            slot.index,
            pid,
            how,
            now - slot.started_at,
            slot.backoff_s,
        )
        with self._lock:
            slot.proc = None
        slot.restart_at = now + slot.backoff_s
        slot.backoff_s = min(2 * slot.backoff_s, MAX_BACKOFF_S)

    def _spawn(self, slot: _Slot) -> None:
        cmd = [
            sys.executable,
            "-m",
            "dicom_node.receive_pool",
            "--index",
            str(slot.index),
            "--parent",
            str(os.getpid()),
            "--log-level",
            str(self._log_level),
        ]
        fds: tuple[int, ...] = ()
        if self._listen_fd is not None:
            cmd += ["--listen-fd", str(self._listen_fd)]
            fds = (self._listen_fd,)
        try:
            # stdout/stderr stay the node's own: one log for all processes.
            env = dict(os.environ)
            if self.metrics_dir is not None:
                env[CHILDREN_DIR_ENV] = self.metrics_dir
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, pass_fds=fds, env=env)
            assert proc.stdin is not None
            proc.stdin.write(self._config_json.encode())
            proc.stdin.close()
        except OSError as exc:
            log.error("cannot start receiver process %d: %s", slot.index, exc)
            slot.restart_at = time.monotonic() + slot.backoff_s
            slot.backoff_s = min(2 * slot.backoff_s, MAX_BACKOFF_S)
            return
        with self._lock:
            slot.proc = proc
        slot.started_at = time.monotonic()
        log.info("receiver process %d started pid=%d", slot.index, proc.pid)

    def _terminate_all(self) -> None:
        with self._lock:
            procs = [s.proc for s in self._slots if s.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._grace_s + KILL_MARGIN_S
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("receiver process pid=%d did not stop: killing it", proc.pid)
                proc.kill()
                proc.wait()
        with self._lock:
            for slot in self._slots:
                slot.proc = None


# -- a child ------------------------------------------------------------------------------------


def _assoc_file(index: int) -> str:
    return f"associations-{index}.json"


def publish_associations(receiver, directory: str, index: int) -> None:
    """Write this child's open associations where the main process reads them for the status
    file and ``dicom-node status`` (:meth:`ReceiverPool.associations`); replaced atomically."""
    path = Path(directory) / _assoc_file(index)
    body = {
        "pid": os.getpid(),
        "associations": [a.as_dict() for a in receiver.active_associations()],
    }
    try:
        replace_json(path, body)
    except OSError as exc:  # the status lacks this child's associations; receiving goes on
        log.warning("cannot publish receiver process %d's associations: %s", index, exc)


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent (its forking thread) ends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the getppid check below still applies
        pass


def _configure_child_logging(level: int, fmt: str) -> None:
    """As ``dicom-node serve`` does: the same format, pynetdicom and alembic quiet, and
    pydicom's value warnings (which may quote a patient's name) off."""
    import pydicom.config

    from dicom_node.logs import configure_logging

    configure_logging(level, fmt)
    if level > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def child_main(argv: list[str] | None = None) -> int:
    """Run one additional receiver until SIGTERM/SIGINT or until the parent is gone. The
    configuration (JSON, the main process's own) comes on stdin."""
    ap = argparse.ArgumentParser(prog="python -m dicom_node.receive_pool")
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--log-level", type=int, default=logging.INFO)
    ap.add_argument("--listen-fd", type=int, default=None, help="the node's listening socket")
    args = ap.parse_args(argv)
    _die_with_parent()
    if os.getppid() != args.parent:  # the parent died before the prctl took effect
        return 0
    config = NodeConfig.model_validate_json(sys.stdin.read())
    _configure_child_logging(args.log_level, config.logging.format)

    from dicom_node import db
    from dicom_node.receive import Receiver

    # Set by the signal handlers, which take no lock: a handler runs in the main thread, which
    # may hold the lock of an Event (a handler that set one could deadlock the process).
    stopping: list[int] = []
    changed = threading.Event()  # an association opened or closed (set by network threads)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    engine = db.make_engine(config.database.url, config.database.store_busy_timeout_ms)
    listen = None
    if args.listen_fd is not None:
        listen = socket.socket(fileno=args.listen_fd)
        listen.setblocking(False)
    directory = os.environ.get(CHILDREN_DIR_ENV)
    receiver = Receiver(
        config,
        db.make_session_factory(engine),
        extra_process=True,
        listen_socket=listen,
        on_change=changed.set,
    )
    receiver.start()
    log.info("receiver process %d listening pid=%d", args.index, os.getpid())
    published = 0.0
    try:
        while not stopping:
            time.sleep(0.1)
            # Published on every open and close of an association, and every second (the
            # counts of stored instances change in between).
            if changed.is_set() or time.monotonic() - published >= 1.0:
                changed.clear()
                published = time.monotonic()
                if directory is not None:
                    publish_associations(receiver, directory, args.index)
            if os.getppid() != args.parent:
                log.warning("receiver process %d: the node is gone; stopping", args.index)
                break
    finally:
        receiver.stop()
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
