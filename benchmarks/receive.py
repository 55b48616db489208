"""Receive throughput: this node (durable acks) vs dcmtk storescp vs Orthanc, on loopback.

    python benchmarks/receive.py [--instances 300] [--trials 3]

Sends the same real 512x512 CT slices (the 20-slice JPEG 2000 sample series, cycled and given
new UIDs, pixel data untouched) with dcmtk ``storescu`` over one association to each receiver,
all with ``TCP_NODELAY=1``:

* this node (``dicom-node serve`` subprocess, fsync on, every 0x0000 means file + index row
  durable);
* dcmtk ``storescp +xa`` writing files (no fsync);
* Debian Orthanc with its default SQLite index;
* for reference, this node with ``storage.fsync: false`` (files not fsync'd; the index commit
  still is), to show what durability costs;
* for reference, a do-nothing pynetdicom C-STORE SCP (same library, same TCP_NODELAY and PDU
  settings, answers 0x0000 without storing anything): the ceiling that pynetdicom's polling
  reactors put on any handler, this node's included.

The nodes load the model in the background at start-up (a torch import of several seconds of
CPU); timing starts only once both have logged ``model loaded``, so that start-up is not measured.

Each trial sends a fresh set of UIDs to every receiver in turn (so nobody sees resends, and
load drift on the machine hits all three alike). Prints instances/s per trial, the median and
best, and the ratios to this node.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.sample_data import fetch_sample_data  # noqa: E402
from tests.support.dcmtk import free_port, storescp, wait_for_port  # noqa: E402
from tests.support.node import NodeProcess, make_instances, send_with_storescu  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402


def _send(files: list[Path], port: int, called_ae: str) -> float:
    t0 = time.perf_counter()
    result = send_with_storescu(files, port, called_ae=called_ae)
    dt = time.perf_counter() - t0
    if result.returncode != 0 or len(result.acknowledged) != len(files):
        tail = "\n".join(result.output.splitlines()[-15:])
        raise SystemExit(
            f"send to {called_ae} failed: rc {result.returncode}, "
            f"{len(result.acknowledged)}/{len(files)} acknowledged\n{tail}"
        )
    return len(files) / dt


def fsync_floor_ms(directory: Path, n: int = 40) -> float:
    """Median latency (ms) of one file fsync on the spool's disk, measured now.

    A durable acknowledgement has two fsync phases in series (the temp file, then the directory
    entry with the index commit beside it), so ``2 x`` this is the floor per instance for one
    association; Orthanc fsyncs only its SQLite commit, one phase.
    """

    directory.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(150_000)  # about one JPEG 2000 CT slice
    times = []
    for i in range(n):
        path = directory / f"probe{i}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, payload)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
            path.unlink()
    return statistics.median(times) * 1000


NOOP_AE = "NOOPSCP"


def run_noop_scp(port: int) -> None:
    """Serve C-ECHO and C-STORE with pynetdicom, answering 0x0000 and storing nothing."""
    import socket

    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import CTImageStorage, Verification

    def on_open(event):
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE(ae_title=NOOP_AE)
    ae.maximum_pdu_size = 0  # as the node: unlimited
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    handlers = [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, lambda event: 0x0000)]
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=handlers)


@contextlib.contextmanager
def noop_scp():
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--noop-scp", str(port)], cwd=REPO)
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def wait_for_model(node: NodeProcess, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while "model loaded" not in node.log_tail(400):
        if time.monotonic() > deadline:
            raise SystemExit(f"node did not log 'model loaded' in {timeout}s:\n{node.log_tail()}")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--noop-scp", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.noop_scp:
        run_noop_scp(args.noop_scp)
        return

    sources = sorted(fetch_sample_data().ct_dicom_repaired.glob("*.dcm"))
    rates: dict[str, list[float]] = {
        "dicom-node": [],
        "storescp": [],
        "orthanc": [],
        "node-nofsync": [],
        "pynetdicom-noop": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-receive-", dir=REPO / "var") as tmp:
        tmp = Path(tmp)
        sets = [
            make_instances(
                sources, args.instances, tmp / f"set{t}", seed=f"bench-{t}-{time.time()}"
            )
            for t in range(args.trials)
        ]
        quiet = {"completion": {"quiet_seconds": 100000}}  # measure receiving only
        node = NodeProcess(tmp / "node", overrides={"storage": {"fsync": True}, **quiet})
        nofsync = NodeProcess(tmp / "nofsync", overrides={"storage": {"fsync": False}, **quiet})
        orthanc = OrthancServer(tmp / "orthanc", aet="ORTHANC")
        with (
            node,
            nofsync,
            orthanc,
            storescp(tmp / "storescp", ae_title="STORESCP") as scp,
            noop_scp() as noop_port,
        ):
            wait_for_model(node)
            wait_for_model(nofsync)
            for t, files in enumerate(sets):
                rates["dicom-node"].append(_send(files, node.port, NodeProcess.AE_TITLE))
                rates["storescp"].append(_send(files, scp.port, "STORESCP"))
                rates["orthanc"].append(_send(files, orthanc.dicom_port, "ORTHANC"))
                rates["node-nofsync"].append(_send(files, nofsync.port, NodeProcess.AE_TITLE))
                rates["pynetdicom-noop"].append(_send(files, noop_port, NOOP_AE))
                print(
                    f"trial {t + 1}: " + "  ".join(f"{k} {v[-1]:6.0f}/s" for k, v in rates.items()),
                    flush=True,
                )
            indexed = node.sqlite("select count(*) from instances")[0][0]
            if indexed != args.instances * args.trials:
                raise SystemExit(f"node indexed {indexed} instances, expected all of them")

        fsync_ms = fsync_floor_ms(tmp / "fsync-probe")

    med = {k: statistics.median(v) for k, v in rates.items()}
    best = {k: max(v) for k, v in rates.items()}
    print(f"\n{args.instances} real 512x512 CT instances (JPEG 2000), one storescu association")
    print(f"{'receiver':<16} {'median/s':>9} {'best/s':>8} {'dicom-node / it':>16}")
    for k in rates:
        print(f"{k:<16} {med[k]:9.0f} {best[k]:8.0f} {med['dicom-node'] / med[k]:16.2f}")
    print(
        f"\nfsync on the spool disk now: {fsync_ms:.2f} ms (median); a durable ack waits for two "
        f"fsync phases in series (temp file, then directory entry + index commit), about "
        f"{2 * fsync_ms:.1f} ms of the node's {1000 / med['dicom-node']:.1f} ms per instance"
    )


if __name__ == "__main__":
    main()
