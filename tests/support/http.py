"""Helpers for tests of the node's HTTP side: a node with ``http`` enabled, a token file, a
client, a series with a known patient name and ID, and Debian's Prometheus.

Example::

    token_file = write_token_file(tmp_path, "alice")
    node = NodeProcess(tmp_path / "n", overrides=http_overrides(token_file))
    with node:
        web = Web(node)
        web.get("/readyz").json()
        web.post("/api/jobs/1/resend", token=ALICE_TOKEN)

Prometheus (``/usr/bin/prometheus``) runs with its own config, TSDB and a free loopback port in
the test's directory; :meth:`Prometheus.query` answers a PromQL instant query.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import requests
import yaml

from tests.support.dcmtk import free_port, wait_for_port
from tests.support.node import rewrite_series

PROMETHEUS = "/usr/bin/prometheus"
TOKENS = {"alice": "alice-" + "0123456789abcdef" * 2, "bob": "bob-" + "fedcba9876543210" * 2}
PATIENT_NAME = "DOE^JANE^Q"
PATIENT_ID = "PID-4711-HTTP"


def write_token_file(directory: Path, *names: str) -> Path:
    """A token file with ``NAME:TOKEN`` lines for ``names`` (from :data:`TOKENS`)."""
    path = Path(directory) / "tokens"
    path.write_text("# test tokens\n" + "".join(f"{n}:{TOKENS[n]}\n" for n in names))
    path.chmod(0o600)
    return path


def http_overrides(token_file: Path | None = None, **http: object) -> dict:
    """Config overrides that enable the HTTP side on a free loopback port."""
    section = {"enabled": True, "bind_address": "127.0.0.1", "port": free_port(), **http}
    if token_file is not None:
        section["auth_token_file"] = str(token_file)
    return {"http": section}


class Web:
    """A client of one node's HTTP side; ``token`` adds ``Authorization: Bearer``."""

    def __init__(self, node, timeout: float = 30.0):
        self.base = f"http://127.0.0.1:{node.config['http']['port']}"
        self.session = requests.Session()
        # A new connection per request: a kept-alive one idle for the server's keep-alive time
        # (uvicorn: 5 s) can be closed by the server just as the next request goes out on it,
        # and that request then fails with "connection reset" (seen once in CI, after a
        # browser session of about that length). Browsers and Prometheus retry such a request.
        self.session.headers["Connection"] = "close"
        self.timeout = timeout

    def url(self, path: str) -> str:
        return self.base + path

    def get(self, path: str, token: str | None = None, **kw) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.session.get(self.url(path), headers=headers, timeout=self.timeout, **kw)

    def post(self, path: str, token: str | None = None, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.session.post(
            self.url(path), headers=headers, timeout=self.timeout, allow_redirects=False, **kw
        )

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Poll /readyz until 200 (the model loads at start-up); returns its body."""
        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                r = self.get("/readyz")
                body = r.json()
                if r.status_code == 200:
                    return body
            time.sleep(0.5)
        raise AssertionError(f"/readyz not 200 after {timeout} s: {body}")


def patient_series(sources: list[Path], out_dir: Path, seed: str) -> list[Path]:
    """The real series under new UIDs, with :data:`PATIENT_NAME` and :data:`PATIENT_ID` (the
    sample data's are empty), pixel data and geometry untouched."""

    def name(ds) -> None:
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID

    return rewrite_series(sorted(sources), out_dir, seed, name)


class Prometheus:
    """Debian's Prometheus scraping ``targets`` every second; ``rule_files`` are loaded."""

    def __init__(self, directory: Path, targets: list[str], rule_files: list[Path] = ()):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": "dicom-node", "static_configs": [{"targets": targets}]}
            ],
        }
        self.config_path = self.dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.dir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Prometheus:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for_port("127.0.0.1", self.port, timeout=60, proc=self.proc)
        # Prometheus listens before its storage is open and answers 503 until then.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=5).ok:
                    return self
            time.sleep(0.2)
        raise TimeoutError(f"Prometheus not ready after 60 s: {self.log_path.read_text()[-2000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def api(self, path: str, **params) -> dict:
        r = requests.get(f"http://127.0.0.1:{self.port}/api/v1/{path}", params=params, timeout=10)
        r.raise_for_status()
        return r.json()["data"]

    def query(self, promql: str) -> list[dict]:
        """The result vector of an instant query (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        return self.api("query", query=promql)["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
