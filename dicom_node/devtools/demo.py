"""The demo behind ``./scripts/demo.sh``: one real thick CT series through the whole node.

1. Fetch the sample data (cached) and write ``var/demo/node.yaml`` from
   ``config/node.example.yaml`` with a free non-privileged port, the spool and SQLite DB under
   ``var/demo``, a 2 s quiet period and one destination: a small local C-STORE SCP (pynetdicom,
   in this process) that stands in for the PACS and writes what it receives to
   ``var/demo/received``.
2. Start ``dicom-node serve`` with that config (log: ``var/demo/node.log``).
3. Send the real 20-slice CT series (the repaired copy, JPEG 2000) with dcmtk's
   ``/usr/bin/storescu`` (``TCP_NODELAY=1``).
4. Wait for the job, check the local destination got every derived instance, copy the PNG
   preview to ``var/demo/preview.png`` and print a summary: slices in and out, spacing, seconds
   per stage and the latency from the last instance received to the last one acknowledged.

Every run starts from an empty ``var/demo`` so that it always shows a fresh job. The script runs
``python -m dicom_node.devtools.demo``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage
from rich.console import Console
from rich.markup import escape

from dicom_node import db
from dicom_node.config import load_config
from dicom_node.db import Job
from dicom_node.devtools.sample_data import REPO_ROOT, fetch_sample_data
from dicom_node.jobs import preview_file

STORESCU = "/usr/bin/storescu"
DEST_AE = "DEMO_PACS"
console = Console()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalDestination:
    """A minimal C-STORE SCP that writes each received instance to ``out_dir``."""

    def __init__(self, out_dir: Path, port: int):
        self.out_dir = out_dir
        self.port = port
        self.received: list[Path] = []
        self.last_ack = 0.0
        self._lock = threading.Lock()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.ae = AE(ae_title=DEST_AE)
        self.ae.add_supported_context(CTImageStorage)
        self.server = None

    def _on_open(self, event) -> None:
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_store(self, event) -> int:
        uid = event.request.AffectedSOPInstanceUID
        path = self.out_dir / f"{uid}.dcm"
        with open(path, "wb") as f:
            f.write(event.encoded_dataset())
        with self._lock:
            self.received.append(path)
            self.last_ack = time.time()
        return 0x0000

    def start(self) -> None:
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_OPEN, self._on_open)]
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=handlers
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def write_config(demo_dir: Path, node_port: int, dest_port: int, preset: str | None) -> Path:
    """The example config with demo paths, ports, a short quiet period and the local PACS."""
    cfg = yaml.safe_load((REPO_ROOT / "config" / "node.example.yaml").read_text())
    cfg["node"]["port"] = node_port
    cfg["storage"]["spool_dir"] = str(demo_dir / "spool")
    cfg["storage"]["min_free_bytes"] = 100_000_000
    cfg["database"]["url"] = f"sqlite:///{demo_dir / 'node.db'}"
    cfg["completion"] = {"quiet_seconds": 2, "check_interval_s": 0.5}
    cfg["destinations"] = [
        {"name": "local", "ae_title": DEST_AE, "host": "127.0.0.1", "port": dest_port}
    ]
    for rule in cfg.get("rules", []):
        rule["action"]["destinations"] = ["local"]
        rule["action"].pop("quiet_seconds", None)
    if preset:
        cfg["model"]["preset"] = preset
    path = demo_dir / "node.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with {proc.returncode}; see var/demo/node.log")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError("the node did not start listening")


def _node_command() -> list[str]:
    script = Path(sys.executable).parent / "dicom-node"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from dicom_node.cli import main; main()"]


def run(preset: str | None = None, timeout_s: float = 1800) -> int:
    demo_dir = REPO_ROOT / "var" / "demo"
    shutil.rmtree(demo_dir, ignore_errors=True)
    demo_dir.mkdir(parents=True)
    console.print("[bold]1/5[/bold] sample data (checksummed, cached under var/sample-data)")
    sources = sorted(Path(fetch_sample_data().ct_dicom_repaired).glob("*.dcm"))

    node_port, dest_port = _free_port(), _free_port()
    config_path = write_config(demo_dir, node_port, dest_port, preset)
    dest = LocalDestination(demo_dir / "received", dest_port)
    dest.start()
    console.print(f"[bold]2/5[/bold] node on 127.0.0.1:{node_port} (config {config_path})")
    log = open(demo_dir / "node.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [*_node_command(), "serve", "--config", str(config_path)],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_port(node_port, proc)
        console.print(f"[bold]3/5[/bold] storescu: {len(sources)} real CT slices (JPEG 2000)")
        env = dict(os.environ, TCP_NODELAY="1")
        t_send = time.time()
        sent = subprocess.run(
            [STORESCU, "-xv", "-aet", "STORESCU", "-aec", "ACVTT", "127.0.0.1", str(node_port),
             *map(str, sources)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        t_last_received = time.time()
        if sent.returncode != 0:
            output = escape((sent.stdout + sent.stderr)[-1500:])
            console.print(f"[red]storescu failed:[/red] {output}")
            return 1
        console.print(f"    sent in {t_last_received - t_send:.2f} s")
        console.print("[bold]4/5[/bold] waiting for the job (quiet period, ACVTT, write, send)")
        job = _wait_for_job(config_path, proc, timeout_s)
        if job is None or job.state.value != "sent":
            reason = job.reason if job is not None else "no job was created"
            console.print(
                f"[red]the job did not finish:[/red] {escape(reason)}; see var/demo/node.log"
            )
            return 1
        n_out = (job.summary or {}).get("n_out")
        _wait_until(lambda: len(dest.received) >= (n_out or 0), 30)
        preview = None
        written = preview_file(job, load_config(config_path).storage.spool_root)
        if written is not None and written.exists():
            preview = demo_dir / "preview.png"
            shutil.copyfile(written, preview)
        console.print("[bold]5/5[/bold] summary")
        _summary(job, dest, preview, t_last_received)
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        dest.stop()


def _wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _wait_for_job(config_path: Path, proc: subprocess.Popen, timeout_s: float):
    cfg = load_config(config_path)
    engine = db.make_engine(cfg.database.url, cfg.database.busy_timeout_ms)
    sessions = db.make_session_factory(engine)
    deadline = time.monotonic() + timeout_s
    last_state = None
    try:
        with console.status("waiting for the quiet period") as status:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    console.print("[red]the node exited[/red]; see var/demo/node.log")
                    return None
                with sessions() as s:
                    job = s.query(Job).order_by(Job.id.desc()).first()
                if job is not None and job.state.value != last_state:
                    last_state = job.state.value
                    status.update(f"job {job.id}: {last_state}")
                if job is not None and job.state.value in ("sent", "failed", "rejected"):
                    return job
                time.sleep(0.5)
    finally:
        engine.dispose()
    return None


def _summary(job, dest: LocalDestination, preview: Path | None, t_last_received: float) -> None:
    s = job.summary or {}
    stages = dict(job.stage_seconds or {})
    rows = [
        ("slices in -> out", f"{s.get('n_in')} -> {s.get('n_out')}"),
        (
            "spacing",
            f"{s.get('spacing_in_mm')} mm -> {s.get('spacing_out_mm')} mm (factor {job.factor})",
        ),
        ("model", f"{job.model_id} {job.model_version}"),
        ("derived series", str(job.derived_series_uid)),
        ("local destination", f"{len(dest.received)} instances in {dest.out_dir}"),
        ("preview (PNG)", str(preview or "-")),
    ]
    for name in ("quiet", "queue_wait", "load", "inference", "write", "preview", "send"):
        if name in stages:
            rows.append((f"seconds: {name}", f"{stages[name]:.2f}"))
    if dest.last_ack:
        rows.append(("last in -> last acknowledged", f"{dest.last_ack - t_last_received:.2f} s"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    note = s.get("model_note")
    if note:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="model preset (default: that of the shipped weights)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the job")
    args = parser.parse_args(argv)
    return run(args.preset, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
