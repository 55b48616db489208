"""Run a real ``dicom-node serve`` in a subprocess, and send to it with dcmtk.

Reusable by every end-to-end test::

    from tests.support.node import NodeProcess, send_with_storescu, make_instances

    with NodeProcess(tmp_path, allowed_callers=[("STORESCU", "127.0.0.1")]) as node:
        result = send_with_storescu(files, node.port)
        assert result.acknowledged == {...}
        node.kill()        # SIGKILL, like a power cut for the process
        node.start()       # same config, same spool and DB
        node.sqlite("select count(*) from instances")

:class:`NodeProcess` writes a YAML config into its directory (a free loopback port, a spool and
SQLite DB under that directory, ``min_free_bytes`` 0 unless given), starts
``dicom-node serve --config ...`` and waits until dcmtk's ``echoscu`` gets an
answer. Anything in ``overrides`` is merged into the config (nested dicts merge), so callers,
destinations, rules and completion settings can be set per test. The node's log goes to
``<dir>/node.log``.

dcmtk tools are always called by full path (pynetdicom installs same-named scripts earlier on
PATH) and with ``TCP_NODELAY=1`` in the environment.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.dcmtk import free_port

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
REPO_ROOT = Path(__file__).resolve().parents[2]


# Process every CT series at once (quiet for 1 s) and send it to a port where nobody listens:
# for tests of what the node accepts, rejects and writes, not of delivery.
PROCESS_CT_NOWHERE = {
    "completion": {"quiet_seconds": 1, "check_interval_s": 0.5},
    "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
    "rules": [
        {
            "name": "ct",
            "match": {"modality": ["CT"]},
            "action": {"target_spacing_mm": 1.0, "destinations": ["pacs"]},
        }
    ],
    "model": {"device": "cpu"},
}


def dicom_node_command() -> list[str]:
    """The ``dicom-node`` console script of this interpreter (or an equivalent)."""
    script = Path(sys.executable).parent / "dicom-node"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from dicom_node.cli import main; main()"]


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def echo(port: int, called_ae: str = "ACVTT", calling_ae: str = "ECHOSCU", timeout: float = 5):
    """Run dcmtk echoscu; returns the CompletedProcess (``returncode`` 0 = echo answered)."""
    return subprocess.run(
        [ECHOSCU, "-to", str(timeout), "-ta", str(timeout), "-aet", calling_ae, "-aec", called_ae,
         "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=timeout + 10,
    )  # fmt: skip


class NodeProcess:
    """A ``dicom-node serve`` subprocess with its own config, spool and DB under ``directory``.

    ``allowed_callers``: (AE title, host or CIDR) pairs; default STORESCU and ECHOSCU from
    127.0.0.1. ``overrides``: merged into the generated config dict.
    """

    AE_TITLE = "ACVTT"

    def __init__(
        self,
        directory: Path,
        allowed_callers: list[tuple[str, str]] | None = None,
        overrides: dict | None = None,
        port: int | None = None,
        preexec_fn=None,
    ):
        self.preexec_fn = preexec_fn  # run in the child before exec (e.g. resource limits)
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.spool = self.dir / "spool"
        self.db_path = self.dir / "node.db"
        self.config_path = self.dir / "node.yaml"
        self.log_path = self.dir / "node.log"
        callers = allowed_callers or [("STORESCU", "127.0.0.1"), ("ECHOSCU", "127.0.0.1")]
        config = {
            "node": {"ae_title": self.AE_TITLE, "bind_address": "127.0.0.1", "port": self.port},
            "allowed_callers": [{"ae_title": a, "host": h} for a, h in callers],
            "storage": {"spool_dir": str(self.spool), "min_free_bytes": 0},
            "database": {"url": f"sqlite:///{self.db_path}"},
        }
        self.config = _merge(config, overrides or {})
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.proc: subprocess.Popen | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 30, expect_rejection: bool = False) -> NodeProcess:
        """Start the subprocess and wait until it answers a C-ECHO.

        ``expect_rejection``: wait only until it answers an association request at all (for
        configurations that reject everyone, e.g. a disk minimum above the free space).
        """
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("node already running")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [*dicom_node_command(), "serve", "--config", str(self.config_path)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=self.preexec_fn,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log_tail()}")
            answer = self.ready_echo(timeout=2)
            if answer.returncode == 0 or (
                expect_rejection and "Association Rejected" in answer.stdout + answer.stderr
            ):
                return self
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"node did not answer C-ECHO in {timeout}s:\n{self.log_tail()}")

    def ready_echo(self, timeout: float) -> subprocess.CompletedProcess:
        """The C-ECHO that :meth:`start` polls until the node answers it."""
        return echo(self.port, self.AE_TITLE, timeout=timeout)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM and wait (clean shutdown); returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> NodeProcess:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> NodeProcess:
        return self if self.running else self.start()

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self.kill()

    # -- inspection ----------------------------------------------------------------------------
    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def sqlite(self, sql: str, *params) -> list[tuple]:
        """Run a read-only query on the node's DB (fine while the node runs: WAL mode)."""
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``dicom-node ARGS --config <this node's config>``."""
        return subprocess.run(
            [*dicom_node_command(), *args, "--config", str(self.config_path)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


# -- sending -----------------------------------------------------------------------------------

_SENDING = re.compile(r"^I: Sending file: (.+)$")
_RSP = re.compile(r"^I: Received Store Response(?: \((\w+)(?:, ([^)]*))?\))?")
_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")


@dataclass
class StoreResult:
    """What storescu saw. ``statuses`` maps each file it sent to the status it got back."""

    returncode: int
    statuses: dict[Path, int] = field(default_factory=dict)
    output: str = ""

    @property
    def acknowledged(self) -> set[Path]:
        """Files that got a success (0x0000) or warning (0xBxxx) response."""
        return {p for p, s in self.statuses.items() if s == 0 or (s & 0xF000) == 0xB000}

    @property
    def failed(self) -> dict[Path, int]:
        return {p: s for p, s in self.statuses.items() if p not in self.acknowledged}


def parse_storescu_output(text: str) -> dict[Path, int]:
    """Map each file storescu reported sending to the DIMSE status of its response.

    Needs ``storescu -d`` output: after every "Sending file" line, the response's
    "DIMSE Status : 0xNNNN" line. A file without a response (association aborted) is absent.
    """
    statuses: dict[Path, int] = {}
    current: Path | None = None
    in_rsp = False
    for line in text.splitlines():
        m = _SENDING.match(line)
        if m:
            current, in_rsp = Path(m.group(1)), False
            continue
        if _RSP.match(line):
            in_rsp = True
            continue
        if in_rsp and current is not None:
            m = _STATUS.search(line)
            if m:
                statuses[current] = int(m.group(1), 16)
                current, in_rsp = None, False
    return statuses


def send_with_storescu(
    files: list[Path] | list[str],
    port: int,
    calling_ae: str = "STORESCU",
    called_ae: str = "ACVTT",
    host: str = "127.0.0.1",
    extra_args: list[str] | None = None,
    timeout: float = 300,
) -> StoreResult:
    """Send ``files`` over one association with dcmtk storescu; parse per-file statuses.

    Proposes JPEG 2000 lossless as well as uncompressed (``-xv``) so the real compressed series
    goes as it is. Never raises on a failed send: inspect ``returncode`` and ``statuses``.
    """
    cmd = [STORESCU, "-d", "-xv", "-to", "30", "-ta", "30", "-td", "60",
           "-aet", calling_ae, "-aec", called_ae, *(extra_args or []), host, str(port),
           *map(str, files)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)
    out = proc.stdout + proc.stderr
    return StoreResult(proc.returncode, parse_storescu_output(out), out)


def start_storescu(
    files: list[Path] | list[str],
    port: int,
    log_path: Path,
    calling_ae: str = "STORESCU",
    called_ae: str = "ACVTT",
) -> subprocess.Popen:
    """Start storescu in the background, its ``-d`` output going to ``log_path``.

    Parse the log with :func:`parse_storescu_output` after it exits.
    """
    cmd = [STORESCU, "-d", "-xv", "-to", "10", "-ta", "10", "-td", "10",
           "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port),
           *map(str, files)]  # fmt: skip
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env())


# -- test data ---------------------------------------------------------------------------------


def make_instances(sources: list[Path], n: int, out_dir: Path, seed: str = "test") -> list[Path]:
    """Write ``n`` real CT instances to ``out_dir``: the ``sources`` cycled, with new UIDs.

    One new study and series for all of them, a new SOP Instance UID each (deterministic in
    ``seed``), InstanceNumber 1..n. Pixel data is copied as it is (never decoded).
    """
    import pydicom
    from pydicom.uid import generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    study = generate_uid(entropy_srcs=[seed, "study"])
    series = generate_uid(entropy_srcs=[seed, "series"])
    datasets = [pydicom.dcmread(p) for p in sorted(sources)]
    paths = []
    for i in range(n):
        ds = datasets[i % len(datasets)]
        sop = generate_uid(entropy_srcs=[seed, "sop", str(i)])
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.InstanceNumber = i + 1
        path = out_dir / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def rewrite_series(
    sources: list[Path], out_dir: Path, seed: str, edit: Callable[[Any], None] | None = None
) -> list[Path]:
    """The ``sources`` as one new study and series (deterministic in ``seed``), each file with a
    new SOP Instance UID, after ``edit(dataset)``; geometry and other attributes as they are."""
    import pydicom
    from pydicom.uid import generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    study = generate_uid(entropy_srcs=[seed, "study"])
    series = generate_uid(entropy_srcs=[seed, "series"])
    paths = []
    for i, src in enumerate(sources):
        ds = pydicom.dcmread(src)
        if edit is not None:
            edit(ds)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "sop", str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out_dir / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def half_size_series(sources: list[Path], out_dir: Path, seed: str, n: int | None = None):
    """The real series at half the matrix (256x256, 2x2 block means of the real pixels, stored
    uncompressed) under new UIDs: the same anatomy and geometry at a quarter of the CPU time."""
    import numpy as np
    from pydicom.uid import ExplicitVRLittleEndian

    def halve(ds) -> None:
        px = ds.pixel_array.astype(np.float32)
        small = px.reshape(px.shape[0] // 2, 2, px.shape[1] // 2, 2).mean(axis=(1, 3))
        ds.PixelData = np.round(small).astype(ds.pixel_array.dtype).tobytes()
        ds.Rows, ds.Columns = small.shape
        ds.PixelSpacing = [float(v) * 2 for v in ds.PixelSpacing]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    return rewrite_series(sources[:n], out_dir, seed, halve)
