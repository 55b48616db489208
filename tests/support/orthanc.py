"""Run Debian's Orthanc (``/usr/sbin/Orthanc``) as a throw-away PACS for tests.

Example::

    from tests.support.orthanc import OrthancServer

    with OrthancServer(tmp_path / "orthanc", aet="PACS",
                       modalities={"NODE": ("NODE", "127.0.0.1", 11112)}) as pacs:
        ...  # C-STORE to ("PACS", "127.0.0.1", pacs.dicom_port)
        series = pacs.get("/series")          # REST API, JSON decoded
        pacs.stop()                            # e.g. simulate a PACS outage
        pacs.start()                           # same storage: earlier instances are still there

Each server gets free loopback DICOM and HTTP ports, its own storage/index directory under
``work_dir`` and a log file (``orthanc.log``). It runs with ``TCP_NODELAY=1`` in the environment.
The configuration is written to ``work_dir/orthanc.json``: no authentication, HTTP on loopback only,
``DicomCheckCalledAet`` false, no plugins, and ``modalities`` as ``DicomModalities``
(name -> (AE title, host, port)). ``config_overrides`` is merged on top, e.g.
``{"DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowFind": False,
"DicomAlwaysAllowMove": False}`` makes Orthanc reject (permanently) any calling AE title that is
not in ``modalities``.

``start()`` returns once the REST API answers ``/system``; ``stop()`` sends SIGTERM and waits.
Both can be called repeatedly; the ports stay the same so senders can retry the same address.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

from tests.support.dcmtk import free_port

ORTHANC = "/usr/sbin/Orthanc"
# Debian installs the plugin versioned (libOrthancDicomWeb.so.1.7 on bookworm).
DICOMWEB_PLUGIN = next(iter(sorted(glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*"))), "")


class OrthancServer:
    """A local Orthanc process with a persistent storage directory (see module docstring)."""

    def __init__(
        self,
        work_dir: Path | str,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        config_overrides: dict[str, Any] | None = None,
        dicom_port: int | None = None,
        http_port: int | None = None,
        dicomweb: bool = False,
        users: dict[str, str] | None = None,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.host = "127.0.0.1"
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.config_path = self.work_dir / "orthanc.json"
        self.log_path = self.work_dir / "orthanc.log"
        storage = self.work_dir / "storage"
        config: dict[str, Any] = {
            "Name": f"test-{aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "ConcurrentJobs": 1,
            "StableAge": 1,
            "SaveJobs": False,
        }
        if dicomweb:  # Debian's orthanc-dicomweb plugin: STOW-RS, QIDO-RS, WADO-RS
            config["Plugins"] = [DICOMWEB_PLUGIN]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "Ssl": False}
        # With users, the REST API and DICOMweb need HTTP basic authentication.
        self.auth: tuple[str, str] | None = next(iter(users.items())) if users else None
        if users:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = dict(users)
        config.update(config_overrides or {})
        self.config = config
        self.config_path.write_text(json.dumps(config, indent=2))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Base URL of the REST API, e.g. ``http://127.0.0.1:8042``."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start Orthanc (no-op if running) and wait until its REST API and DICOM port answer."""
        if self.running:
            return
        env = dict(os.environ, TCP_NODELAY="1")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [ORTHANC, str(self.config_path)],
                cwd=self.work_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self.process.returncode}; log:\n{self.log()[-3000:]}"
                )
            try:
                if requests.get(self.url + "/system", timeout=1, auth=self.auth).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer within {timeout} s; log:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop Orthanc gracefully (SIGTERM, then SIGKILL after ``timeout``); storage is kept."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def get(self, path: str, **kwargs: Any) -> Any:
        """GET ``path`` from the REST API and return the decoded JSON (raises on HTTP errors)."""
        kwargs.setdefault("auth", self.auth)
        r = requests.get(self.url + path, timeout=kwargs.pop("timeout", 10), **kwargs)
        r.raise_for_status()
        return r.json()

    def instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every instance Orthanc holds."""
        uids = set()
        for oid in self.get("/instances"):
            uids.add(self.get(f"/instances/{oid}/simplified-tags")["SOPInstanceUID"])
        return uids

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> OrthancServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
