"""Fault benchmark: crashes, a full disk and a PACS outage against a real node; every figure
must be 0.

    python benchmarks/faults.py [--rounds 3] [--outage-s 20] [--json out.json]

Scenarios (each with real processes: ``dicom-node serve``, dcmtk's storescu, a recording PACS
that answers C-STORE and C-FIND and logs every delivery, duplicates included):

* **crash during receive**: storescu sends a series; the node is killed (``kill -9``) at a random
  moment of the association; it restarts and the sender sends the whole series again, as a
  PACS retries.
* **crash during send**: the node is killed while it delivers a derived series to the (slow)
  PACS; it restarts and finishes the delivery.
* **disk full during a job**: spool and database on a 96 MB tmpfs that is filled (and the
  database locked) while a job runs; then space comes back and a second series is sent.
* **PACS outage during send**: the PACS is killed mid-delivery and comes back after
  ``--outage-s`` seconds.

Figures: acknowledged instances lost (acknowledged by the node but not indexed with their file
after everything), duplicate deliveries (instances the PACS received more than once), partial
series delivered (derived series at the PACS that lack instances, or more than one derived
series for one source), pipeline stalls (a series not processed within the time limit after
the fault ended) and dead letters (jobs failed). Series are the real 20-slice CT at half the
matrix (256x256, real pixels) so that each job takes seconds on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.devtools.sample_data import fetch_sample_data  # noqa: E402
from tests.support.dcmtk import free_port, wait_for_port  # noqa: E402
from tests.support.fs import fill  # noqa: E402
from tests.support.node import (  # noqa: E402
    NodeProcess,
    half_size_series,
    parse_storescu_output,
    send_with_storescu,
    start_storescu,
)
from tests.support.polling import wait_until  # noqa: E402
from tests.support.recording_scp import read_record  # noqa: E402

N_IN, N_OUT = 20, 39  # the series, and its derived series at factor 2
RULE = {
    "name": "thick-ct",
    "match": {"modality": ["CT"], "spacing_mm": [1.5, 10]},
    "action": {"target_spacing_mm": 1.0, "destinations": ["pacs"], "priority": 5},
}


@dataclass
class Figures:
    scenario: str
    acked_lost: int = 0
    duplicates: int = 0
    partial_series: int = 0
    stalls: int = 0
    dead_letters: int = 0
    seconds: float = 0.0


class Pacs:
    """The recording PACS as a process that can be killed and started again."""

    def __init__(self, directory: Path, delay_s: float):
        self.port = free_port()
        self.record = directory / "pacs-record.txt"
        self.record.touch()
        self.delay_s = delay_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "tests.support.recording_scp", str(self.port),
               str(self.record), str(self.delay_s), "find"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=REPO)
        wait_for_port("127.0.0.1", self.port, timeout=30, proc=self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def deliveries(self) -> list[tuple[str, str]]:
        return read_record(self.record)


def _wait(predicate, timeout: float, interval: float = 0.2):
    """What ``predicate`` returned once truthy, or None after ``timeout`` (a stall)."""
    try:
        return wait_until(predicate, timeout, "", interval)
    except AssertionError:
        return None


def _job_state(node: NodeProcess, series_uid: str) -> str | None:
    rows = node.sqlite(
        "select state from jobs where source_series_uid = ? order by id desc limit 1", series_uid
    )
    return rows[0][0] if rows else None


def _await_sent(fig: Figures, node: NodeProcess, series_uid: str) -> None:
    """Wait up to 300 s for the series' job to be sent: a stall if it is not, a dead letter if
    it failed."""
    if _wait(lambda: _job_state(node, series_uid) == "sent", 300) is None:
        fig.stalls += 1
    fig.dead_letters += _job_state(node, series_uid) == "failed"


def _lost(node: NodeProcess, acked_files: list[Path]) -> int:
    """Acknowledged instances whose index row or spool file is missing."""
    import pydicom

    lost = 0
    for f in acked_files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        rows = node.sqlite("select file_path from instances where sop_instance_uid = ?", uid)
        if not rows or not (node.spool / rows[0][0]).exists():
            lost += 1
    return lost


def _series(sources: list[Path], work: Path, seed: str) -> tuple[list[Path], str]:
    import pydicom

    files = half_size_series(sources, work / seed, seed=seed)
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _delivery_figures(fig: Figures, deliveries: list[tuple[str, str]], n_series: int) -> None:
    per_series = Counter(series for series, _ in set(deliveries))
    fig.duplicates += len(deliveries) - len(set(deliveries))
    fig.partial_series += sum(1 for n in per_series.values() if n != N_OUT)
    fig.partial_series += max(0, len(per_series) - n_series)  # two derived series for one source


def crash_during_receive(node, pacs, sources, work, rounds, rng) -> Figures:
    fig, t0, start = Figures("crash during receive"), time.monotonic(), len(pacs.deliveries())
    for r in range(rounds):
        files, uid = _series(sources, work, f"receive-{r}")
        log = work / f"storescu-{r}.log"
        sender = start_storescu(files, node.port, log)
        time.sleep(rng.uniform(0.02, 0.25))
        node.kill()
        sender.wait(60)
        acked = [f for f, st in parse_storescu_output(log.read_text()).items() if st == 0]
        node.start()
        fig.acked_lost += _lost(node, acked)
        send_with_storescu(files, node.port)  # the sender retries the whole series
        _await_sent(fig, node, uid)
    _delivery_figures(fig, pacs.deliveries()[start:], rounds)
    fig.seconds = time.monotonic() - t0
    return fig


def crash_during_send(node, pacs, sources, work, rounds, rng) -> Figures:
    fig, t0, start = Figures("crash during send"), time.monotonic(), len(pacs.deliveries())
    for r in range(rounds):
        files, uid = _series(sources, work, f"send-{r}")
        before = len(pacs.deliveries())
        send_with_storescu(files, node.port)
        kill_at = rng.randint(3, N_OUT - 5)
        if _wait(lambda b=before, k=kill_at: len(pacs.deliveries()) >= b + k, 300, 0.02) is None:
            fig.stalls += 1
            continue
        node.kill()
        node.start()
        _await_sent(fig, node, uid)
    _delivery_figures(fig, pacs.deliveries()[start:], rounds)
    fig.seconds = time.monotonic() - t0
    return fig


def pacs_outage(node, pacs, sources, work, outage_s) -> Figures:
    fig, t0, start = Figures("PACS outage during send"), time.monotonic(), len(pacs.deliveries())
    files, uid = _series(sources, work, "outage")
    before = len(pacs.deliveries())
    send_with_storescu(files, node.port)
    if _wait(lambda: len(pacs.deliveries()) >= before + 10, 300, 0.02) is None:
        fig.stalls += 1
    pacs.kill()
    time.sleep(outage_s)
    pacs.start()
    # Backoff from the node's defaults (2 s doubling, capped): allow for a few rounds of it.
    _await_sent(fig, node, uid)
    _delivery_figures(fig, pacs.deliveries()[start:], 1)
    fig.seconds = time.monotonic() - t0
    return fig


def disk_full(sources, work, pacs) -> Figures:
    fig, t0 = Figures("disk full during a job"), time.monotonic()
    mnt = work / "small-fs"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mnt)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        print("disk full: cannot mount a tmpfs here (needs root); scenario skipped")
        fig.scenario += " (skipped)"
        return fig
    start = len(pacs.deliveries())
    try:
        node = _node(work / "node-fs", pacs, spool=mnt / "spool", db=mnt / "node.db")
        node.start()
        files, uid = _series(sources, work, "disk-1")
        acked = send_with_storescu(files, node.port).acknowledged
        _wait(lambda: _job_state(node, uid) == "running", 300, 0.05)
        filler, locker = fill(mnt), _lock(mnt / "node.db")
        time.sleep(10)  # the job ends meanwhile and cannot record its outcome
        locker.kill()
        filler.unlink()
        fig.acked_lost += _lost(node, sorted(acked))
        files2, uid2 = _series(sources, work, "disk-2")
        acked2 = send_with_storescu(files2, node.port).acknowledged
        for u in (uid, uid2):
            _await_sent(fig, node, u)
        fig.acked_lost += _lost(node, sorted(acked2))
        node.kill()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    _delivery_figures(fig, pacs.deliveries()[start:], 2)
    fig.seconds = time.monotonic() - t0
    return fig


def _lock(db_path: Path) -> subprocess.Popen:
    code = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(3600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(db_path)], stdout=subprocess.PIPE, text=True
    )
    proc.stdout.readline()
    return proc


def _node(directory: Path, pacs: Pacs, spool: Path | None = None, db: Path | None = None):
    overrides = {
        "completion": {"quiet_seconds": 1, "check_interval_s": 0.3, "interrupted_hold_s": 5},
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
        ],
        "rules": [RULE],
        "model": {"device": "cpu"},
        "send": {"base_delay_s": 1, "max_delay_s": 5},
        "database": {"busy_timeout_ms": 500},
    }
    if spool is not None:
        overrides["storage"] = {"spool_dir": str(spool), "min_free_bytes": 0}
    if db is not None:
        overrides["database"]["url"] = f"sqlite:///{db}"
    node = NodeProcess(directory, overrides=overrides)
    if db is not None:
        node.db_path = db
    if spool is not None:
        node.spool = spool
    return node


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="crash rounds per crash scenario")
    ap.add_argument("--outage-s", type=float, default=20.0, help="PACS downtime")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--keep", type=Path, help="work here and keep logs and stores (not a tmp dir)")
    ap.add_argument(
        "--only", choices=["receive", "send", "outage", "disk"], action="append", help="scenarios"
    )
    args = ap.parse_args()
    rng = random.Random(args.seed)
    sources = sorted(Path(fetch_sample_data().ct_dicom_repaired).glob("*.dcm"))
    figures: list[Figures] = []
    only = set(args.only or ["receive", "send", "outage", "disk"])
    with contextlib.ExitStack() as stack:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=False)
            work = args.keep.resolve()
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="faults-")))
        pacs = Pacs(work, delay_s=0.05)
        pacs.start()
        node = _node(work / "node", pacs)
        try:
            node.start()
            if "receive" in only:
                figures.append(crash_during_receive(node, pacs, sources, work, args.rounds, rng))
            if "send" in only:
                figures.append(crash_during_send(node, pacs, sources, work, args.rounds, rng))
            if "outage" in only:
                figures.append(pacs_outage(node, pacs, sources, work, args.outage_s))
            node.stop()
            if "disk" in only:
                figures.append(disk_full(sources, work, pacs))
        finally:
            node.kill()
            pacs.kill()
    cols = ["acked_lost", "duplicates", "partial_series", "stalls", "dead_letters"]
    print(f"{'scenario':<30}" + "".join(f"{c:>15}" for c in cols) + f"{'seconds':>10}")
    for f in figures:
        row = "".join(f"{getattr(f, c):>15}" for c in cols)
        print(f"{f.scenario:<30}{row}{f.seconds:>10.1f}")
    total = {c: sum(getattr(f, c) for f in figures) for c in cols}
    print(f"{'total':<30}" + "".join(f"{total[c]:>15}" for c in cols))
    if args.json:
        args.json.write_text(json.dumps([asdict(f) for f in figures], indent=1))
    return 0 if not any(total.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
