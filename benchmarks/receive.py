"""Receive throughput: this node (durable acks, one and several processes) vs Orthanc, on loopback.

    python benchmarks/receive.py [--instances 300] [--trials 3] [--senders 1,4,8]
        [--receiver-processes N] [--receivers dicom-node,dicom-node-multi,orthanc,...]

Sends the same real 512x512 CT slices (the 20-slice JPEG 2000 sample series, cycled and given
new UIDs, pixel data untouched) with dcmtk ``storescu`` to each receiver, all with
``TCP_NODELAY=1``:

* ``dicom-node``: this node (``dicom-node serve`` subprocess, one process, fsync on, every
  0x0000 means file + index row durable);
* ``dicom-node-multi``: the same with ``node.receiver_processes: N`` (``--receiver-processes``,
  default the number of CPUs): N processes accepting on one port, printed as
  ``dicom-node xN``;
* ``storescp``: dcmtk ``storescp +xa`` writing files (no fsync; with ``--fork`` when there are
  several senders, as it otherwise serves one association at a time);
* ``orthanc``: Debian Orthanc with its default SQLite index;
* ``node-nofsync``, for reference: this node with ``storage.fsync: false`` (files not fsync'd;
  the index commit still is), to show what durability costs;
* ``node-polling``, for reference: this node (one process) with
  ``node.association_reactor: polling``, pynetdicom's own reactor threads, which check for work
  every millisecond, instead of the event-driven ones (dicom_node/association_reactor.py);
* ``pynetdicom-noop``, for reference: a do-nothing pynetdicom C-STORE SCP (same library, same
  TCP_NODELAY and PDU settings, answers 0x0000 without storing anything) with pynetdicom's
  polling reactors: the ceiling they put on any handler;
* ``noop-event``: the same do-nothing SCP with the node's event-driven reactors.

``--receivers`` picks a subset (default all). The nodes load the model in the background at
start-up (a torch import of several seconds of CPU); timing starts only once each has logged
``model loaded``, so that start-up is not measured.

Each trial sends a fresh set of UIDs to every receiver in turn (so nobody sees resends, and
load drift on the machine hits all of them alike). Prints instances/s per trial and, per sender
count, the median and best, the ratio to Orthanc (of the medians, and paired: the median of the
per-trial ratios), with one sender the milliseconds per instance (single-association latency),
and the CPU milliseconds per instance (user + system, from /proc) of the receiver's processes,
of the storescu senders and of the whole machine (every core, kernel threads included): a
receiver sharing the machine with its senders cannot exceed cores / (machine CPU per instance)
instances per second.

``--senders N`` (N > 1) measures several senders at once, as when a PACS pushes several series
in parallel: each trial starts N ``storescu`` processes together, each sending its own
``--instances`` instances (its own study and series, distinct UIDs) over its own association, to
each receiver in turn. The rate is then the aggregate: N x ``--instances`` over the wall time from
the first start to the last exit. Every sender must exit 0 with every instance answered 0x0000.
``--senders 1,4,8`` measures each count in turn, in one run, against the same receivers. N is at
most the node's default ``node.max_associations`` (32). Orthanc keeps its default
``DicomThreadsCount`` (4), so above 4 senders some of its associations wait for a free thread.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.devtools.sample_data import fetch_sample_data  # noqa: E402
from tests.support.dcmtk import free_port, storescp, wait_for_port  # noqa: E402
from tests.support.node import (  # noqa: E402
    NodeProcess,
    StoreResult,
    make_instances,
    parse_storescu_output,
    send_with_storescu,
    start_storescu,
)
from tests.support.orthanc import OrthancServer  # noqa: E402

# The node's default node.max_associations: more senders than this would be rejected.
MAX_SENDERS = 32


def _check(result: StoreResult, files: list[Path], who: str, acknowledged: set[Path]) -> None:
    """Abort the benchmark unless storescu exited 0 with every file in ``acknowledged``."""
    if result.returncode != 0 or len(acknowledged) != len(files):
        tail = "\n".join(result.output.splitlines()[-15:])
        raise SystemExit(
            f"send to {who} failed: rc {result.returncode}, "
            f"{len(acknowledged)}/{len(files)} acknowledged\n{tail}"
        )


def _send(batches: list[list[Path]], port: int, called_ae: str, log_dir: Path) -> float:
    """Send each batch over its own storescu association, all started at once; instances/s.

    One batch: a plain ``send_with_storescu`` (success or warning statuses count). Several: one
    background ``storescu`` per batch, timed from the first start to the last exit; each must
    exit 0 with every instance answered 0x0000.
    """
    if len(batches) == 1:
        (files,) = batches
        t0 = time.perf_counter()
        result = send_with_storescu(files, port, called_ae=called_ae)
        dt = time.perf_counter() - t0
        _check(result, files, called_ae, result.acknowledged)
        return len(files) / dt

    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"sender{i + 1}.log" for i in range(len(batches))]
    procs = []
    try:
        t0 = time.perf_counter()
        for files, log in zip(batches, logs, strict=True):
            procs.append(start_storescu(files, port, log, called_ae=called_ae))
        for proc in procs:
            proc.wait()
        dt = time.perf_counter() - t0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, (files, proc, log) in enumerate(zip(batches, procs, logs, strict=True)):
        output = log.read_text(errors="replace")
        result = StoreResult(proc.returncode, parse_storescu_output(output), output)
        ok = {p for p, status in result.statuses.items() if status == 0x0000}
        _check(result, files, f"{called_ae} (sender {i + 1} of {len(batches)})", ok)
    return sum(map(len, batches)) / dt


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system, kernel time of fsyncs included) that process ``root`` and
    every process below it have used so far, reaped children included."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    used: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # after "pid (comm)": state ppid ... utime(11) stime(12) cutime(13) cstime(14)
        fields = text.rpartition(")")[2].split()
        parent[int(entry)] = int(fields[1])
        used[int(entry)] = sum(int(f) for f in fields[11:15])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(used.get(pid, 0) for pid in tree) / tick


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy so far (every core; /proc/stat's
    user + nice + system + irq + softirq + steal): what per-process figures leave out, such as
    the kernel's own threads (loopback TCP, the file system journal)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    """CPU seconds used by this process's reaped children (the storescu senders)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


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


def run_noop_scp(port: int, event_reactor: bool) -> None:
    """Serve C-ECHO and C-STORE with pynetdicom, answering 0x0000 and storing nothing; with
    ``event_reactor`` its associations are the node's event-driven ones."""
    import socket

    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import CTImageStorage, Verification

    from dicom_node.association_reactor import EventRequestHandler

    class NoopAE(AE):
        def make_server(self, address, *args, **kwargs):
            if event_reactor:
                kwargs["request_handler"] = EventRequestHandler
            return super().make_server(address, *args, **kwargs)

    def on_open(event):
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = NoopAE(ae_title=NOOP_AE)
    ae.maximum_pdu_size = 0  # as the node: unlimited
    ae.maximum_associations = MAX_SENDERS  # as the node (pynetdicom's default is 10)
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    handlers = [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, lambda event: 0x0000)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    server.shutdown()


@contextlib.contextmanager
def noop_scp(event_reactor: bool):
    port = free_port()
    reactor = ["--noop-event"] if event_reactor else []
    proc = subprocess.Popen([sys.executable, __file__, "--noop-scp", str(port), *reactor], cwd=REPO)
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def wait_for_model(node: NodeProcess, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while "model loaded" not in node.log_tail(400):
        if time.monotonic() > deadline:
            raise SystemExit(f"node did not log 'model loaded' in {timeout}s:\n{node.log_tail()}")
        time.sleep(0.5)


def _senders_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or not all(1 <= v <= MAX_SENDERS for v in values):
        raise argparse.ArgumentTypeError(f"each sender count must be 1..{MAX_SENDERS}")
    return values


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--instances", type=int, default=300, help="instances each sender sends (default 300)"
    )
    ap.add_argument("--trials", type=int, default=3, help="trials per receiver (default 3)")
    ap.add_argument(
        "--senders",
        type=_senders_list,
        default=[1],
        metavar="N[,N...]",
        help="storescu processes sending at once, each its own --instances over its own "
        "association; the rate is then the aggregate, N x --instances over the wall time from "
        "first start to last exit. A list (1,4,8) measures each count in the same run "
        f"(default 1, each at most {MAX_SENDERS})",
    )
    ap.add_argument(
        "--receiver-processes",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="node.receiver_processes of the multi-process node (default: the number of CPUs, "
        f"{os.cpu_count()} here)",
    )
    ap.add_argument(
        "--receivers",
        default=",".join(RECEIVERS),
        help="which receivers to measure, comma-separated, from: "
        f"{', '.join(RECEIVERS)} (default all; dicom-node-multi is the node with "
        "--receiver-processes)",
    )
    ap.add_argument("--noop-scp", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--noop-event", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.noop_scp:
        return args
    args.receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    unknown = set(args.receivers) - set(RECEIVERS)
    if unknown:
        ap.error(f"unknown receivers {sorted(unknown)} (choose from {', '.join(RECEIVERS)})")
    if not 1 <= args.receiver_processes <= 16:
        ap.error("--receiver-processes must be between 1 and 16")
    return args


# Every receiver the benchmark knows, in sending order.
RECEIVERS = (
    "dicom-node",
    "dicom-node-multi",
    "storescp",
    "orthanc",
    "node-nofsync",
    "node-polling",
    "pynetdicom-noop",
    "noop-event",
)


def _start_receivers(
    stack: contextlib.ExitStack, args: argparse.Namespace, tmp: Path
) -> dict[str, tuple[int, str, NodeProcess | None, int]]:
    """Start the chosen receivers; name -> (port, called AE title, the node if it is one, the
    process id whose process tree is the receiver)."""
    quiet = {"completion": {"quiet_seconds": 100000}}  # measure receiving only
    nodes = {
        "dicom-node": {"storage": {"fsync": True}},
        "dicom-node-multi": {
            "storage": {"fsync": True},
            "node": {"receiver_processes": args.receiver_processes},
        },
        "node-nofsync": {"storage": {"fsync": False}},
        "node-polling": {"storage": {"fsync": True}, "node": {"association_reactor": "polling"}},
    }
    out: dict[str, tuple[int, str, NodeProcess | None, int]] = {}
    for name in args.receivers:
        if name in nodes:
            node = stack.enter_context(NodeProcess(tmp / name, overrides={**nodes[name], **quiet}))
            out[name] = (node.port, NodeProcess.AE_TITLE, node, node.proc.pid)
        elif name == "orthanc":
            orthanc = stack.enter_context(OrthancServer(tmp / "orthanc", aet="ORTHANC"))
            out[name] = (orthanc.dicom_port, "ORTHANC", None, orthanc.process.pid)
        elif name == "storescp":
            fork = ["--fork"] if max(args.senders) > 1 else []
            scp = stack.enter_context(
                storescp(tmp / "storescp", ae_title="STORESCP", extra_args=fork)
            )
            out[name] = (scp.port, "STORESCP", None, scp.process.pid)
        elif name in ("pynetdicom-noop", "noop-event"):
            port, pid = stack.enter_context(noop_scp(name == "noop-event"))
            out[name] = (port, NOOP_AE, None, pid)
    for _port, _ae, node, _pid in out.values():
        if node is not None:
            wait_for_model(node)
    return out


def _report(
    args: argparse.Namespace,
    rates: dict[int, dict[str, list[float]]],
    cpu: dict[int, dict[str, list[float]]],
    sender_cpu: dict[int, dict[str, list[float]]],
    machine_cpu: dict[int, dict[str, list[float]]],
) -> None:
    """Per sender count: median and best instances/s, the ratio to Orthanc, with one sender
    the milliseconds per instance (single-association latency), and the CPU milliseconds per
    instance of the receiver (all its processes and threads), of the senders and of the whole
    machine."""
    multi = f"dicom-node x{args.receiver_processes}"
    print(
        "\n/ orthanc: the receiver's median rate over Orthanc's; paired: the median of the "
        "per-trial ratios (each trial measures every receiver back to back, so a ratio within "
        "a trial shares the machine's state of the moment; the medians can fall on different "
        "trials)"
    )
    for senders, by_receiver in rates.items():
        med = {k: statistics.median(v) for k, v in by_receiver.items()}
        best = {k: max(v) for k, v in by_receiver.items()}
        if senders == 1:
            how = "one storescu association"
        else:
            how = (
                f"{senders} storescu associations at once (aggregate rate: all "
                f"{senders * args.instances} over first start to last exit)"
            )
        print(f"\n{args.instances} real 512x512 CT instances (JPEG 2000) per sender, {how}")
        print(
            f"{'receiver':<18} {'median/s':>9} {'best/s':>8} {'/ orthanc':>10} {'paired':>7} "
            f"{'ms/inst':>8} {'cpu ms/inst':>12} {'senders cpu':>12} {'machine cpu':>12}"
        )
        for k in by_receiver:
            label = multi if k == "dicom-node-multi" else k
            if "orthanc" in med:
                paired = statistics.median(
                    a / b for a, b in zip(by_receiver[k], by_receiver["orthanc"], strict=True)
                )
                ratio = f"{med[k] / med['orthanc']:10.2f} {paired:7.2f}"
            else:
                ratio = f"{'-':>10} {'-':>7}"
            ms = f"{1000 / med[k]:8.1f}" if senders == 1 else f"{'-':>8}"
            rx_cpu = statistics.median(cpu[senders][k])
            tx_cpu = statistics.median(sender_cpu[senders][k])
            all_cpu = statistics.median(machine_cpu[senders][k])
            print(
                f"{label:<18} {med[k]:9.0f} {best[k]:8.0f} {ratio} {ms} {rx_cpu:12.2f} "
                f"{tx_cpu:12.2f} {all_cpu:12.2f}"
            )
    cores = os.cpu_count() or 1
    print(
        f"\nmachine cpu: busy CPU ms of the whole machine ({cores} cores) per instance; where "
        f"it times the rate to about {cores * 1000} ms/s, the machine is saturated and only "
        "less CPU per instance (not more processes) raises the rate"
    )


def main() -> None:
    args = _parse_args()
    if args.noop_scp:
        run_noop_scp(args.noop_scp, args.noop_event)
        return

    sources = sorted(fetch_sample_data().ct_dicom_repaired.glob("*.dcm"))
    # sender count -> receiver -> instances/s per trial, in sending order
    rates: dict[int, dict[str, list[float]]] = {n: {} for n in args.senders}
    # sender count -> receiver -> CPU ms per instance per trial: the receiver's processes, and
    # the storescu senders that sent to it
    cpu: dict[int, dict[str, list[float]]] = {n: {} for n in args.senders}
    sender_cpu: dict[int, dict[str, list[float]]] = {n: {} for n in args.senders}
    # ... and the whole machine's busy CPU ms per instance (receiver, senders, kernel, the rest)
    machine_cpu: dict[int, dict[str, list[float]]] = {n: {} for n in args.senders}
    with tempfile.TemporaryDirectory(prefix="bench-receive-", dir=REPO / "var") as tmp:
        tmp = Path(tmp)
        logs = tmp / "storescu-logs"
        with contextlib.ExitStack() as stack:
            receivers = _start_receivers(stack, args, tmp)
            for senders in args.senders:
                for t in range(args.trials):
                    # one batch per sender, each its own study and series, fresh UIDs
                    batches = [
                        make_instances(
                            sources,
                            args.instances,
                            tmp / f"set{senders}-{t}-{s}",
                            seed=f"bench-{senders}-{t}-{s}-{time.time()}",
                        )
                        for s in range(senders)
                    ]
                    n = senders * args.instances
                    for key, (port, ae, _node, pid) in receivers.items():
                        c0, s0, m0 = tree_cpu_s(pid), _children_cpu_s(), machine_busy_s()
                        rates[senders].setdefault(key, []).append(_send(batches, port, ae, logs))
                        c1, s1, m1 = tree_cpu_s(pid), _children_cpu_s(), machine_busy_s()
                        machine_cpu[senders].setdefault(key, []).append((m1 - m0) * 1000 / n)
                        cpu[senders].setdefault(key, []).append((c1 - c0) * 1000 / n)
                        sender_cpu[senders].setdefault(key, []).append((s1 - s0) * 1000 / n)
                    print(
                        f"senders {senders} trial {t + 1}: "
                        + "  ".join(f"{k} {v[-1]:6.0f}/s" for k, v in rates[senders].items()),
                        flush=True,
                    )
                    for batch in batches:  # the senders' copies; every receiver has its own
                        shutil.rmtree(batch[0].parent)
            expected = args.instances * args.trials * sum(args.senders)
            for key, (_port, _ae, node, _pid) in receivers.items():
                if node is not None:
                    indexed = node.sqlite("select count(*) from instances")[0][0]
                    if indexed != expected:
                        raise SystemExit(f"{key} indexed {indexed} instances, expected {expected}")

        fsync_ms = fsync_floor_ms(tmp / "fsync-probe")

    _report(args, rates, cpu, sender_cpu, machine_cpu)
    print(
        f"\nfsync on the spool disk now: {fsync_ms:.2f} ms (median); a durable ack waits for two "
        f"fsync phases in series (temp file, then directory entry + index commit): about "
        f"{2 * fsync_ms:.1f} ms per instance on each association"
    )


if __name__ == "__main__":
    main()
