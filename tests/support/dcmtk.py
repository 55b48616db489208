"""Run dcmtk's ``storescp`` as a real C-STORE peer for tests.

Example::

    from tests.support.dcmtk import storescp

    with storescp(tmp_path, ae_title="STORESCP") as scp:
        ...  # send to ("STORESCP", "127.0.0.1", scp.port)
        assert len(scp.received_files()) == 20

The full path ``/usr/bin/storescp`` is used because pynetdicom installs a same-named command
that may come first on PATH. The process runs with ``TCP_NODELAY=1`` in its environment (dcmtk
reads it), on a free loopback port, writing into ``<work_dir>/received``; it accepts all transfer
syntaxes (``+xa``) and the standard storage classes. ``extra_args`` passes dcmtk options through,
e.g. ``["--refuse"]`` (reject every association, permanently), ``["--abort-after"]`` (abort the
association after the first C-STORE request, before answering it) or ``["--sleep-after", "1"]``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

STORESCP = "/usr/bin/storescp"


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0, proc=None) -> None:
    """Block until something accepts TCP connections on (host, port); raise on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


@dataclass
class StoreSCP:
    """A running storescp: where to send, and where its files land."""

    ae_title: str
    host: str
    port: int
    output_dir: Path
    log_path: Path
    process: subprocess.Popen

    def received_files(self) -> list[Path]:
        """Files storescp has written so far (sorted by name)."""
        return sorted(p for p in self.output_dir.rglob("*") if p.is_file())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def storescp(
    work_dir: Path,
    *,
    ae_title: str = "STORESCP",
    port: int | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[StoreSCP]:
    """Start ``/usr/bin/storescp`` for the duration of the ``with`` block, then stop it."""
    work_dir = Path(work_dir)
    out = work_dir / "received"
    out.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = work_dir / "storescp.log"
    env = dict(os.environ, TCP_NODELAY="1")
    cmd = [STORESCP, "-v", "+xa", "-aet", ae_title, "-od", str(out), *extra_args, str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=work_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        yield StoreSCP(ae_title, "127.0.0.1", port, out, log_path, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
