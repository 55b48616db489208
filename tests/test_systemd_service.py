"""The shipped unit, run as a real systemd service, installed the way systemd/README.md says.

A real systemd boots as PID 1 of a private namespace (tests/support/systemd.py; /etc, /opt and
/var are throwaway overlays, so nothing changes on the host). In it, as root: the service user
is created, the project is copied to /opt/dicom-node and set up with Debian's /usr/bin/python3
(`PYTHON=/usr/bin/python3 ./scripts/setup.sh`), the config is installed in /etc/dicom-node and
checked as the service user, and the unit is installed unchanged and enabled. Then, with the
whole hardening active, from the host: C-ECHO, the real 20-slice CT sent with dcmtk, the derived
series arriving in a real Orthanc, a SIGKILL that Restart=on-failure recovers from without losing
the acknowledged instances, and a clean SIGTERM stop. The sandbox is checked from inside the
service's own mount namespace.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import yaml

from tests.support import systemd as sd
from tests.support.dcmtk import free_port
from tests.support.node import echo, send_with_storescu
from tests.support.orthanc import OrthancServer
from tests.support.polling import wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
UNIT = "dicom-node"
SYSTEM_PYTHON = "/usr/bin/python3"
FACTOR = 2


def _skip_reason() -> str | None:
    reason = sd.unavailable()
    if reason:
        return reason
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} not found"
    ok = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys, venv; sys.exit(sys.version_info < (3, 11))"],
        capture_output=True,
    )
    return None if ok.returncode == 0 else f"{SYSTEM_PYTHON} lacks venv or is older than 3.11"


def _project_tar() -> bytes:
    """The project's files as a git checkout has them (tracked + untracked, not ignored)."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout  # fmt: skip
    return subprocess.run(
        ["tar", "--null", "--ignore-failed-read", "-T", "-", "-cf", "-"],
        cwd=REPO, input=names, capture_output=True, check=True,
    ).stdout  # fmt: skip


def _install(ns: sd.SystemdNamespace, config: dict) -> None:
    """systemd/README.md's install steps, with the project copied instead of cloned."""
    ns.sh("useradd --system --home-dir /var/lib/dicom-node --shell /usr/sbin/nologin dicom-node")
    ns.sh("mkdir -p /opt/dicom-node")
    proc = subprocess.run(
        ["nsenter", "-t", str(ns.pid), "-p", "-m", "tar", "-xf", "-", "-C", "/opt/dicom-node"],
        input=_project_tar(), capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    setup = ns.sh(f"cd /opt/dicom-node && PYTHON={SYSTEM_PYTHON} ./scripts/setup.sh", timeout=900)
    assert "setup complete" in setup.stdout, setup.stdout[-2000:]
    ns.sh("install -d -m 0750 -o dicom-node -g dicom-node /var/lib/dicom-node")
    ns.sh("install -d -m 0750 -o root -g dicom-node /etc/dicom-node")
    subprocess.run(
        ["nsenter", "-t", str(ns.pid), "-p", "-m", "sh", "-c",
         "cat > /etc/dicom-node/node.yaml && chown root:dicom-node /etc/dicom-node/node.yaml"
         " && chmod 0640 /etc/dicom-node/node.yaml"],
        input=yaml.safe_dump(config).encode(), check=True, timeout=30,
    )  # fmt: skip
    check = ns.sh(
        "setpriv --reuid dicom-node --regid dicom-node --init-groups "
        "env DICOM_NODE_CONFIG=/etc/dicom-node/node.yaml "
        "/opt/dicom-node/.venv/bin/dicom-node config check"
    )
    assert ": ok" in check.stdout, check.stdout
    ns.sh(
        "install -m 0644 /opt/dicom-node/systemd/dicom-node.service /etc/systemd/system/ && "
        "systemctl daemon-reload && systemctl enable --now dicom-node"
    )


def _source_count(ns: sd.SystemdNamespace) -> int:
    out = ns.run(
        "/opt/dicom-node/.venv/bin/python", "-c",
        "import sqlite3; print(sqlite3.connect('/var/lib/dicom-node/node.db')"
        ".execute('select count(*) from instances').fetchone()[0])",
    ).stdout  # fmt: skip
    return int(out.strip())


@pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "")
def test_unit_runs_hardened_as_a_service(tmp_path, sample_data):
    sources = sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm"))
    first = pydicom.dcmread(sources[0], stop_before_pixels=True)
    port = free_port()
    with (
        OrthancServer(tmp_path / "orthanc", aet="PACS") as pacs,
        sd.SystemdNamespace(tmp_path / "ns") as ns,
    ):
        config = {
            "node": {"ae_title": "ACVTT", "bind_address": "127.0.0.1", "port": port},
            "allowed_callers": [
                {"ae_title": "STORESCU", "host": "127.0.0.1"},
                {"ae_title": "ECHOSCU", "host": "127.0.0.1"},
            ],
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}
            ],
            "storage": {"spool_dir": "/var/lib/dicom-node/spool", "min_free_bytes": 10_000_000},
            "database": {"url": "sqlite:////var/lib/dicom-node/node.db"},
            "completion": {"quiet_seconds": 1, "check_interval_s": 0.5},
            "rules": [
                {
                    "name": "thick-ct",
                    "match": {"modality": ["CT"]},
                    "action": {"factor": FACTOR, "destinations": ["pacs"]},
                }
            ],
            "model": {"device": "cpu"},
        }
        _install(ns, config)
        wait_until(lambda: "model loaded" in ns.journal(UNIT), 120, "the model to load")
        main_pid = int(ns.unit_property(UNIT, "MainPID"))
        assert main_pid > 0

        # The sandbox, seen from inside the service's own mount namespace (the namespace-local
        # MainPID): code and config read-only, home directories hidden, state writable.
        sandbox = ns.sh(
            f"nsenter -t {main_pid} -m sh -c '"
            "touch /opt/dicom-node/x 2>&1; touch /etc/x 2>&1; "
            "echo root-entries $(ls -A /root | wc -l); "
            "touch /var/lib/dicom-node/w && echo state-writable'",
            check=False,
        ).stdout
        assert sandbox.count("Read-only file system") == 2, sandbox
        assert "root-entries 0" in sandbox, sandbox
        assert "state-writable" in sandbox, sandbox
        owner = ns.run("stat", "-c", "%U", f"/proc/{main_pid}").stdout.strip()
        assert owner == "dicom-node"

        # Receive and process, hardened.
        assert echo(port).returncode == 0
        sent = send_with_storescu(sources, port)
        assert sent.returncode == 0 and len(sent.acknowledged) == len(sources), sent.output[-2000:]
        n_out = (len(sources) - 1) * FACTOR + 1
        wait_until(
            lambda: any(
                len(pacs.get(f"/series/{s}")["Instances"]) == n_out for s in pacs.get("/series")
            ),
            300,
            "the derived series in Orthanc",
            interval=1,
        )

        # SIGKILL: Restart=on-failure brings it back; nothing acknowledged is lost.
        ns.run("systemctl", "kill", "-s", "SIGKILL", UNIT)
        wait_until(lambda: ns.unit_property(UNIT, "NRestarts") == "1", 30, "the restart")
        wait_until(lambda: ns.unit_property(UNIT, "ActiveState") == "active", 30, "active again")
        wait_until(lambda: echo(port).returncode == 0, 30, "C-ECHO after the restart")
        assert _source_count(ns) >= len(sources)

        # SIGTERM stop: clean, quick, not "failed".
        t0 = time.monotonic()
        ns.run("systemctl", "stop", UNIT, timeout=90)
        assert time.monotonic() - t0 < 60
        assert ns.unit_property(UNIT, "ActiveState") == "inactive"
        assert ns.unit_property(UNIT, "Result") == "success"

        journal = ns.journal(UNIT)
        assert "signal SIGTERM: shutting down" in journal
        # No patient data in the journal.
        for value in (str(first.get("PatientName", "")), str(first.get("PatientID", ""))):
            if len(value) >= 3:
                assert value not in journal
        security = ns.run("systemd-analyze", "security", UNIT, "--no-pager").stdout
        level = re.search(r"Overall exposure level for \S+: ([\d.]+)", security)
        assert level and float(level.group(1)) <= 2.0, security[-500:]
