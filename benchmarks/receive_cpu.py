"""CPU and wall time per received instance, per step of the store path, inside one process.

    python benchmarks/receive_cpu.py [--instances 300] [--threads 1] [--rounds 3]

Drives :meth:`dicom_node.receive.Receiver.store_dataset` directly (no network, no pynetdicom)
with the real 20-slice sample CT series (JPEG 2000, cycled, new UIDs each), on SQLite with the
node's settings (fsync on, synchronous=FULL, pydicom's value validation off). ``--threads N``
stores from N threads at once, each its own series, as N associations would. Prints, per instance:

* ``process CPU``: CPU time of the whole process (every thread: store, pool, SQLite) / instances;
* ``wall``: wall time / instances (the aggregate rate's inverse);
* per step, the median wall time and mean CPU time (``time.thread_time`` of the thread that ran
  it) of each function of the path it finds: whatever of these names the checked-out code has
  is timed, so the script runs unchanged on older commits (``git worktree add``).

Each round stores a fresh set of UIDs into a fresh spool and database; the figures are the
median over rounds. The first round warms up (imports, caches) and is not counted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pydicom.config
import sqlalchemy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node import db, header, receive  # noqa: E402
from dicom_node.config import parse_config  # noqa: E402
from dicom_node.devtools.sample_data import fetch_sample_data  # noqa: E402
from tests.support.node import make_instances  # noqa: E402

# (owner, attribute name, label): the steps timed, where the checked-out code has them.
_MODULE_STEPS = [
    (receive, "encode_file_meta", "file meta encode"),
    (receive, "_file_meta_bytes", "file meta encode"),
    (receive, "read_header", "header: read_header (all)"),
    (receive, "read_dataset_header", "header: read_header (all)"),
    (header, "_parse", "header:  pydicom parse"),
    (header, "_parse_dataset", "header:  pydicom parse"),
    (header, "scan_encoding", "header:  encoding scan"),
    (header, "_check_uids", "header:  UID checks"),
    (header, "instance_plane", "header:  plane (geometry)"),
    (header, "pixel_problem", "header:  pixel checks"),
]
_RECEIVER_STEPS = [
    ("spool", "write_temp", "temp write + fsync (pool)"),
    ("spool", "place", "rename into place"),
    ("spool", "sync_dir", "dir fsync (pool)"),
    ("indexer", "record", "index row + commit"),
    (None, "_disk_low", "free disk check"),
]


class Timings:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wall: dict[str, list[float]] = defaultdict(list)
        self.cpu: dict[str, list[float]] = defaultdict(list)
        self.commits = 0  # database commits, all rounds

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                c1, w1 = time.thread_time(), time.perf_counter()
                with self.lock:
                    self.wall[label].append(w1 - w0)
                    self.cpu[label].append(c1 - c0)

        return timed


def _config(tmp: Path, threads: int):
    return parse_config(
        {
            "node": {"port": 11112, "max_associations": max(4, threads)},
            "allowed_callers": [{"ae_title": "BENCH", "host": "127.0.0.0/8"}],
            "storage": {"spool_dir": str(tmp / "spool"), "min_free_bytes": 0},
            "database": {"url": f"sqlite:///{tmp}/node.db"},
            "completion": {"quiet_seconds": 100000},
        }
    )


def _split(part10: bytes) -> tuple[bytes, str, str, str]:
    """(data set, SOP class, SOP instance, transfer syntax) of a Part 10 file, as C-STORE
    hands them over."""
    import pydicom

    meta_len = int.from_bytes(part10[140:144], "little")
    fm = pydicom.dcmread(__import__("io").BytesIO(part10), stop_before_pixels=True).file_meta
    return (
        part10[144 + meta_len :],
        str(fm.MediaStorageSOPClassUID),
        str(fm.MediaStorageSOPInstanceUID),
        str(fm.TransferSyntaxUID),
    )


def run_round(sources: list[Path], args, tmp: Path, rnd: int, timings: Timings) -> tuple:
    """Store ``args.instances`` per thread; returns (process CPU s, wall s, instances)."""
    (tmp / f"r{rnd}").mkdir()
    cfg = _config(tmp / f"r{rnd}", args.threads)
    db.upgrade(cfg.database.url)
    receiver = receive.Receiver(cfg, db.make_session_factory(db.make_engine(cfg.database.url)))
    for owner_name, attr, label in _RECEIVER_STEPS:
        owner = receiver if owner_name is None else getattr(receiver, owner_name)
        if hasattr(owner, attr):
            setattr(owner, attr, timings.wrap(label, getattr(owner, attr)))
    commits = [0]

    def count_commit(_conn) -> None:
        commits[0] += 1

    sqlalchemy.event.listen(receiver.indexer.engine, "commit", count_commit)
    batches = []
    for t in range(args.threads):
        paths = make_instances(sources, args.instances, tmp / f"in{rnd}-{t}", f"cpu-{rnd}-{t}")
        batches.append([_split(p.read_bytes()) for p in paths])
    statuses: list[int] = []

    def sender(batch) -> None:
        for dataset, sop_class, sop_uid, ts in batch:
            res = receiver.store_dataset(dataset, sop_class, sop_uid, ts, "BENCH", "127.0.0.1")
            statuses.append(res.status)

    workers = [threading.Thread(target=sender, args=(b,)) for b in batches]
    c0, w0 = time.process_time(), time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    receiver._io_pool.shutdown()
    n = len(statuses)
    if statuses != [0] * (args.instances * args.threads):
        raise SystemExit(f"not every store succeeded: {sorted(set(statuses))}")
    timings.commits += commits[0]
    return cpu, wall, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=300, help="per thread and round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    # As `dicom-node serve` and the receiver processes read: values not validated (the
    # warnings could quote patient data, and validating costs CPU the node does not spend).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    sources = sorted(fetch_sample_data().ct_dicom_repaired.glob("*.dcm"))
    originals = {}
    with tempfile.TemporaryDirectory(prefix="bench-receive-cpu-", dir=REPO / "var") as tmp:
        tmp = Path(tmp)
        results = []
        counted = Timings()
        for rnd in range(args.rounds + 1):
            timings = Timings() if rnd == 0 else counted
            for module, attr, label in _MODULE_STEPS:
                if hasattr(module, attr):
                    originals.setdefault((module, attr), getattr(module, attr))
                    setattr(module, attr, timings.wrap(label, originals[(module, attr)]))
            cpu, wall, n = run_round(sources, args, tmp, rnd, timings)
            if rnd:
                results.append((cpu / n, wall / n))
                print(f"round {rnd}: {n} instances, process CPU {1000 * cpu / n:.2f} ms/inst, "
                      f"wall {1000 * wall / n:.2f} ms/inst", flush=True)  # fmt: skip
    cpu_ms = 1000 * statistics.median(r[0] for r in results)
    wall_ms = 1000 * statistics.median(r[1] for r in results)
    print(f"\n{args.threads} thread(s) x {args.instances} instances x {args.rounds} rounds")
    print(f"process CPU per instance {cpu_ms:.2f} ms, wall per instance {wall_ms:.2f} ms")
    total = args.instances * args.threads * args.rounds
    print(f"index commits per instance {counted.commits / total:.2f}")
    print(f"{'step':<30} {'calls/inst':>10} {'wall med ms':>12} {'CPU mean ms':>12}")
    for label in counted.wall:
        walls, cpus = counted.wall[label], counted.cpu[label]
        print(
            f"{label:<30} {len(walls) / total:10.2f} {1000 * statistics.median(walls):12.3f} "
            f"{1000 * statistics.fmean(cpus):12.3f}"
        )


if __name__ == "__main__":
    main()
