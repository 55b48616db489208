"""Jobs per hour with 1 worker and with 2 workers on one PostgreSQL (issue 12, "Jobs per hour").

For each worker count, on a fresh database of a private PostgreSQL cluster: one receiver node
(``serve --role receiver``) and K worker nodes (``serve --role worker``, model on the CPU), all
real processes sharing one spool. The workers start first and are ready (``/readyz``: model
loaded) before anything is sent; then the same N real series (the 20-slice CT, at half or full
matrix, under new UIDs) go to the receiver with dcmtk's storescu, one association each. The
window runs from the first job claim to the last job written (the jobs have no destination, so
sending is not part of it); jobs per hour = N / window.

CPU: the whole machine's busy share over the window (/proc/stat, all cores), and each worker's
CPU seconds over the window (its process tree, psutil). The node has no setting for inference
threads: each worker's torch uses its default intra-op thread count, printed below.

    python benchmarks/workers.py [--series 8] [--full-size] [--workers 1 2] [--torch-threads T]

Pause other CPU work first (this machine has 2 cores).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node import db  # noqa: E402
from dicom_node.devtools.sample_data import fetch_sample_data  # noqa: E402
from tests.support.node import (  # noqa: E402
    NodeProcess,
    half_size_series,
    rewrite_series,
    send_with_storescu,
)
from tests.support.postgres import PostgresCluster  # noqa: E402
from tests.test_scale_out import WorkerProcess, node_config  # noqa: E402


@dataclass
class Result:
    workers: int
    jobs: int
    window_s: float
    run_s: float  # first send -> every job done: the window of the CPU figures
    machine_busy: float  # share of all cores over run_s, 0..1
    worker_cpu_s: list[float]  # each worker's process tree over run_s
    receiver_cpu_s: float
    inference_s: list[float]  # per job, from stage_seconds
    jobs_per_worker: dict[str, int]

    @property
    def jobs_per_hour(self) -> float:
        return self.jobs * 3600 / self.window_s


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _busy_for(seconds: float) -> float:
    busy0, total0 = _cpu_times()
    time.sleep(seconds)
    busy1, total1 = _cpu_times()
    return (busy1 - busy0) / (total1 - total0)


def _tree_cpu_s(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _series(sources: list[Path], out: Path, n: int, full_size: bool) -> list[list[Path]]:
    make = rewrite_series if full_size else half_size_series
    return [make(sources, out / f"s{i}", seed=f"workers-bench-{i}") for i in range(n)]


def _jobs(engine: sa.Engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("select id, state, reason, claimed_by, stage_seconds from jobs order by id")
        ).all()
    return [dict(r._mapping) for r in rows]


def _claim_to_written(engine: sa.Engine) -> float:
    with engine.connect() as conn:
        first, last = conn.execute(
            sa.text(
                "select min(case when kind = 'job_claimed' then at end),"
                " max(case when kind = 'job_written' then at end) from audit_events"
            )
        ).one()
    return (last - first).total_seconds()


def run(
    k: int, series: list[list[Path]], cluster: PostgresCluster, tmp: Path, threads: int | None
) -> Result:
    url = cluster.create_database()
    db.upgrade(url)  # once, before the nodes start
    spool = tmp / f"spool-{k}"
    receiver = NodeProcess(tmp / f"rx-{k}", overrides=node_config("rx", "receiver", url, spool, []))
    workers = []
    for i in range(1, k + 1):
        cfg = node_config(f"wk-{i}", "worker", url, spool, [])
        cfg["model"]["torch_threads"] = threads  # None: torch's own default
        workers.append(WorkerProcess(tmp / f"wk-{k}-{i}", cfg))
    nodes = [receiver, *workers]
    engine = db.make_engine(url)
    try:
        with ThreadPoolExecutor(len(nodes)) as pool:
            list(pool.map(lambda node: node.start(timeout=180), nodes))
        t0, (busy0, total0) = time.monotonic(), _cpu_times()
        cpu0 = [_tree_cpu_s(w.proc.pid) for w in workers]
        rx0 = _tree_cpu_s(receiver.proc.pid)
        for files in series:
            sent = send_with_storescu(files, receiver.port)
            if len(sent.acknowledged) != len(files):
                raise SystemExit(f"storescu failed:\n{sent.output[-2000:]}")
        deadline = time.monotonic() + 3600
        while True:
            jobs = _jobs(engine)
            if len(jobs) == len(series) and all(
                j["state"] in ("sent", "failed", "rejected") for j in jobs
            ):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"jobs not finished after an hour: {jobs}")
            time.sleep(0.5)
        t1, (busy1, total1) = time.monotonic(), _cpu_times()
        cpu1 = [_tree_cpu_s(w.proc.pid) for w in workers]
        rx1 = _tree_cpu_s(receiver.proc.pid)
        bad = [j for j in jobs if j["state"] != "sent"]
        if bad:
            raise SystemExit(f"jobs did not finish: {bad}\n{workers[0].log_tail()}")
        window = _claim_to_written(engine)
    finally:
        for node in nodes:
            node.kill()
        engine.dispose()
    per_worker: dict[str, int] = {}
    for j in jobs:
        per_worker[j["claimed_by"]] = per_worker.get(j["claimed_by"], 0) + 1
    return Result(
        workers=k,
        jobs=len(jobs),
        window_s=window,
        run_s=t1 - t0,
        receiver_cpu_s=rx1 - rx0,
        machine_busy=(busy1 - busy0) / (total1 - total0),
        worker_cpu_s=[b - a for a, b in zip(cpu0, cpu1, strict=True)],
        inference_s=[float(j["stage_seconds"].get("inference", 0)) for j in jobs],
        jobs_per_worker=per_worker,
    )


def torch_threads() -> str:
    """What a worker's torch uses for intra-op threads, in a fresh process like a node's."""
    code = "import torch; print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=8, help="series per run (the same set)")
    ap.add_argument("--full-size", action="store_true", help="512x512 (default: 256x256)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="model.torch_threads of every worker (default: unset, torch's own default)",
    )
    args = ap.parse_args()
    sources = sorted(Path(fetch_sample_data().ct_dicom_repaired).glob("*.dcm"))
    size = "512x512" if args.full_size else "256x256"
    print(f"{args.series} real CT series, {len(sources)} slices each at {size}, factor 2 to 1 mm;")
    omp = os.environ.get("OMP_NUM_THREADS")
    print(
        f"CPU: {os.cpu_count()} cores; torch intra-op threads per worker: "
        f"{args.torch_threads or f'torch default ({torch_threads()})'}; OMP_NUM_THREADS={omp}"
    )
    print(f"machine CPU busy before the run (5 s): {100 * _busy_for(5):.0f} %")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as tmp, PostgresCluster() as pg:
        series = _series(sources, Path(tmp) / "in", args.series, args.full_size)
        for k in args.workers:
            r = run(k, series, pg, Path(tmp), args.torch_threads)
            results.append(r)
            inf = sorted(r.inference_s)
            print(
                f"{k} worker(s): {r.jobs} jobs in {r.window_s:.1f} s (first claim -> last "
                f"written) = {r.jobs_per_hour:.0f} jobs/hour; jobs per worker "
                f"{r.jobs_per_worker}; inference per job median {inf[len(inf) // 2]:.2f} s"
            )
            print(
                f"  CPU over {r.run_s:.1f} s (first send -> last job done): machine "
                f"{100 * r.machine_busy:.0f} % busy of {os.cpu_count()} cores; each worker "
                + ", ".join(
                    f"{c:.1f} s = {100 * c / r.run_s:.0f} % of one core" for c in r.worker_cpu_s
                )
            )
            cores = os.cpu_count() or 1
            rest = r.machine_busy * cores * r.run_s - sum(r.worker_cpu_s) - r.receiver_cpu_s
            print(
                f"  receiver {r.receiver_cpu_s:.1f} s; everything else (PostgreSQL, storescu, "
                f"any other load) {rest:.1f} s"
            )
    if len(results) >= 2:
        base = results[0]
        for r in results[1:]:
            ratio = r.jobs_per_hour / base.jobs_per_hour
            print(f"{r.workers} vs {base.workers} worker(s): {ratio:.2f}x jobs/hour")


if __name__ == "__main__":
    main()
