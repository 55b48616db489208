"""A real systemd, booted as PID 1 of a private PID + mount namespace, for testing the shipped
unit (``systemd/dicom-node.service``) as a service.

Example::

    from tests.support.systemd import SystemdNamespace

    with SystemdNamespace(tmp_path / "ns") as ns:
        ns.run("systemctl", "is-system-running")     # runs inside, as root
        ns.sh("useradd --system dicom-node")          # /etc is a throwaway overlay

``tests/support/systemd_boot.sh`` becomes PID 1 of the namespace: it puts throwaway overlays
(upper layers in ``work_dir``) on ``/etc``, ``/opt`` and ``/var`` and fresh tmpfs on ``/tmp`` and
``/run``, masks the tmpfiles clean-up, and execs ``/lib/systemd/systemd`` into ``basic.target``
(so nothing the host enabled, such as Orthanc, starts). Installing users, units, code under
``/opt`` or state under ``/var/lib`` therefore changes nothing on the host; the network is shared,
so the host reaches a service on 127.0.0.1. Leaving the context kills PID 1, which ends every
process in the namespace and drops its mounts.

Needs root, util-linux ``unshare``/``nsenter``, systemd and overlayfs; ``unavailable()`` says
what is missing (tests skip with that reason).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"
BOOT = Path(__file__).with_name("systemd_boot.sh")


def unavailable() -> str | None:
    """Why a namespaced systemd cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (mount and PID namespaces)"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"util-linux {tool} not found"
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} not found"
    return None


class SystemdNamespace:
    """systemd as PID 1 of a private namespace (see the module docstring)."""

    def __init__(self, work_dir: Path | str) -> None:
        self.work_dir = Path(work_dir)
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # systemd's PID as the host sees it

    def start(self, timeout: float = 60) -> SystemdNamespace:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.work_dir / "boot.log", "wb")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--mount", "--fork", "--mount-proc", "--propagation", "private",
             str(BOOT), str(self.work_dir)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"namespace exited {self.proc.returncode}: {self.boot_log()}")
            if self.pid is None:
                children = subprocess.run(
                    ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True
                ).stdout.split()
                if children and _comm(int(children[0])) == "systemd":
                    self.pid = int(children[0])
            if self.pid is not None:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return self
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"systemd did not come up (state {state!r}): {self.boot_log()}")

    def boot_log(self) -> str:
        path = self.work_dir / "boot.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        """Run a command inside the namespace (as root); text output captured."""
        if self.pid is None:
            raise RuntimeError("namespace not started")
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-p", "-m", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-3000:]}"
            )
        return proc

    def sh(
        self, script: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        return self.run("bash", "-euo", "pipefail", "-c", script, check=check, timeout=timeout)

    def unit_property(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", unit, "-p", prop, "--value").stdout.strip()

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout

    def close(self) -> None:
        if self.proc is None:
            return
        # SIGKILL to the namespace's PID 1 ends every process in it; its mounts go with it.
        for pid in (self.pid, self.proc.pid):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None
        self.pid = None

    def __enter__(self) -> SystemdNamespace:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
