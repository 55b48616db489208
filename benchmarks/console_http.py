"""HTTP side: time to scrape ``/metrics`` and to load the console's overview, with a full database.

    python benchmarks/console_http.py [--series 10000] [--jobs 10000] [--acks-per-job 40]
        [--repeat 30]

Fills a fresh SQLite index (alembic schema, WAL, as the node runs it) with ``--series`` series of
20 instances each, ``--jobs`` jobs in a realistic mix of states (90 % sent, 5 % failed with a
reason, the rest queued, running or waiting to be sent), acknowledgements from two destinations
(``--acks-per-job`` each for every sent job) plus a third destination that never succeeded (its
"last success" query has to read every acknowledgement row), and an audit trail of about seven
events per job. Then serves the real application with uvicorn on a loopback port, as
``dicom-node serve`` does, and times ``GET /metrics`` and ``GET /`` with a keep-alive client:
``--warmup`` requests first, then ``--repeat`` timed ones. Prints the median, 95th percentile
and maximum in milliseconds, the sizes of the answers, and the first request's time (the first
scrape after a start reads every acknowledgement row once to find each destination's last
success; later ones read only new rows). Target: both medians under 250 ms.

``--keep DIR`` builds the database in DIR and leaves it there; a later run with the same DIR
reuses it. ``--serve`` keeps serving afterwards until Ctrl-C (to look at the console by hand).
"""

from __future__ import annotations

import argparse
import os
import sys

# This file is named http.py: as a script its folder comes first on sys.path and would hide the
# standard library's http package from everything imported below. The repository root replaces it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import hashlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import requests  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from dicom_node import db  # noqa: E402
from dicom_node.config import parse_config  # noqa: E402
from dicom_node.db import JobState, SeriesState  # noqa: E402
from dicom_node.web.context import NodeView  # noqa: E402
from dicom_node.web.server import HttpServer  # noqa: E402

DESTINATIONS = ["pacs", "archive", "research"]  # "research" never acknowledged anything
FAILURES = [
    "send failed permanently: pacs: association rejected (permanent, calling AE title not "
    "recognised)",
    "send gave up after 8.0 h of failures (97 attempts): archive: connection refused",
    "the whole series is rejected: slice #3 at (-249.5, -437.5, -770.5) mm cannot be used",
]


def _uid(*parts: object) -> str:
    return "2.25." + str(int(hashlib.sha256(repr(parts).encode()).hexdigest()[:30], 16))


def _job_state(i: int, n: int) -> JobState:
    share = i / n
    if share < 0.90:
        return JobState.sent
    if share < 0.95:
        return JobState.failed
    return [JobState.queued, JobState.running, JobState.written][i % 3]


def populate(url: str, n_series: int, n_jobs: int, acks_per_job: int) -> dict[str, int]:
    """Fill the index; returns how many rows each table got."""
    db.upgrade(url)
    engine = db.make_engine(url)
    rnd = random.Random(7)
    t0 = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=7)
    counts: dict[str, int] = {}
    with engine.begin() as conn:
        studies = [{"id": i + 1, "study_uid": _uid("st", i)} for i in range(n_series)]
        conn.execute(insert(db.Study), studies)
        series = []
        for i in range(n_series):
            at = t0 + timedelta(seconds=60 * i)
            state = SeriesState.processed if i < n_jobs * 0.9 else SeriesState.complete
            if i >= n_jobs:
                state = rnd.choice([SeriesState.ignored, SeriesState.rejected])
            series.append(
                {"id": i + 1, "series_uid": _uid("se", i), "study_id": i + 1, "modality": "CT",
                 "series_description": "CT Body 3.0", "state": state, "first_received": at,
                 "last_received": at, "calling_ae": "CT_SCANNER1", "revision": 20,
                 "state_reason": "no rule matched" if state is SeriesState.ignored else None}
            )  # fmt: skip
        conn.execute(insert(db.Series), series)
        counts["series"] = len(series)
        instances = [
            {"series_id": s + 1, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
             "sop_instance_uid": _uid("in", s, k), "instance_number": k + 1,
             "transfer_syntax_uid": "1.2.840.10008.1.2.4.90", "file_path": f"x/{s}/{k}.dcm",
             "file_size": 150_000, "sha256": "0" * 64}
            for s in range(n_series)
            for k in range(20)
        ]  # fmt: skip
        conn.execute(insert(db.Instance), instances)
        counts["instances"] = len(instances)
        counts.update(_jobs_and_acks(conn, n_jobs, acks_per_job, t0, rnd))
    engine.dispose()
    return counts


def _jobs_and_acks(conn, n_jobs: int, acks_per_job: int, t0: datetime, rnd) -> dict[str, int]:
    jobs, acks, events = [], [], []
    for i in range(n_jobs):
        state = _job_state(i, n_jobs)
        at = t0 + timedelta(seconds=60 * i + 30)
        jobs.append(
            {"id": i + 1, "series_id": i + 1, "source_series_uid": _uid("se", i),
             "instances_hash": f"{i:064x}", "model_id": "acvtt-default",
             "model_version": "eb7dde02c1b5", "factor": 3, "rule_name": "thick-ct",
             "destinations": DESTINATIONS[:2], "priority": 5, "state": state,
             "reason": rnd.choice(FAILURES) if state is JobState.failed else None,
             "attempts": 1, "send_attempts": 1, "derived_series_uid": _uid("de", i),
             "stage_seconds": {"quiet": 30.0, "load": 0.4, "inference": 9.8, "write": 1.2},
             "source_sop_uids": [], "derived_files": [f"{k:05d}.dcm" for k in range(58)],
             "summary": {"n_in": 20, "n_out": 58}, "created_at": at, "updated_at": at}
        )  # fmt: skip
        for kind in ("series_complete", "job_queued", "job_running", "job_written"):
            events.append(_event(at, kind, i, None))
        if state is JobState.sent:
            for dest in DESTINATIONS[:2]:
                acks += [
                    {"job_id": i + 1, "destination": dest, "sop_instance_uid": _uid("de", i, k),
                     "status": 0, "sent_at": at}
                    for k in range(acks_per_job)
                ]  # fmt: skip
                events.append(_send_event(at, i, dest, None, acks_per_job))
            events.append(_send_event(at, i, "research", "connection refused", 0))
            events.append(_event(at, "job_sent", i, None))
    conn.execute(insert(db.Job), jobs)
    for start in range(0, len(acks), 50_000):
        conn.execute(insert(db.SentInstance), acks[start : start + 50_000])
    conn.execute(insert(db.AuditEvent), events)
    return {"jobs": len(jobs), "sent_instances": len(acks), "audit_events": len(events)}


def _event(at: datetime, kind: str, i: int, detail: dict | None) -> dict:
    # executemany needs the same keys in every row
    return {"at": at, "kind": kind, "series_uid": _uid("se", i), "job_id": i + 1,
            "detail": json.dumps(detail) if detail else None}  # fmt: skip


def _send_event(at: datetime, i: int, dest: str, failure: str | None, acked: int) -> dict:
    detail = {"destination": dest, "sent_now": acked, "acknowledged": acked, "of": 58,
              "failure": failure, "seconds": 1.5}  # fmt: skip
    return _event(at, "send_attempt", i, detail)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_get(session: requests.Session, url: str, warmup: int, repeat: int) -> dict:
    first = None
    for _ in range(warmup):
        t = time.perf_counter()
        session.get(url, timeout=60).raise_for_status()
        first = first or (time.perf_counter() - t) * 1000
    times = []
    size = 0
    for _ in range(repeat):
        t = time.perf_counter()
        r = session.get(url, timeout=60)
        r.raise_for_status()
        size = len(r.content)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p95_ms": times[max(0, int(round(0.95 * len(times))) - 1)],
        "max_ms": times[-1],
        "first_ms": first,
        "bytes": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--acks-per-job", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--keep", type=Path, help="build the database in this directory")
    parser.add_argument("--serve", action="store_true", help="keep serving until Ctrl-C")
    args = parser.parse_args()
    if args.jobs > args.series:
        parser.error("--jobs must not exceed --series (one job per series)")
    work = args.keep or Path(tempfile.mkdtemp(prefix="http-bench-"))
    (work / "spool").mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{work / 'node.db'}"
    if (work / "node.db").exists():
        print(f"database: reusing {work / 'node.db'} (--keep of an earlier run)")
    else:
        t = time.perf_counter()
        counts = populate(url, args.series, args.jobs, args.acks_per_job)
        print(f"database: {counts} in {time.perf_counter() - t:.1f} s ({work})")
    config = parse_config(
        {
            "storage": {"spool_dir": str(work / "spool"), "min_free_bytes": 10**9},
            "database": {"url": url},
            "destinations": [
                {"name": n, "ae_title": n.upper(), "host": "127.0.0.1", "port": 104 + i}
                for i, n in enumerate(DESTINATIONS)
            ],
            "http": {"enabled": True, "port": _free_port()},
        }
    )
    engine = db.make_engine(url)
    view = NodeView(
        config=config,
        sessions=db.make_session_factory(engine),
        started=datetime.now(UTC),
        receiver_listening=lambda: True,  # no receiver here: only the HTTP side is measured
        runs_jobs=False,
    )
    server = HttpServer(view)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        with requests.Session() as session:
            for path in ("/metrics", "/"):
                r = time_get(session, base + path, args.warmup, args.repeat)
                print(
                    f"GET {path:9s} median {r['median_ms']:6.1f} ms  p95 {r['p95_ms']:6.1f} ms  "
                    f"max {r['max_ms']:6.1f} ms  ({r['bytes'] / 1000:.0f} kB, {args.repeat} runs; "
                    f"first request {r['first_ms'] or 0:.0f} ms)"
                )
        if args.serve:
            print(f"serving {base}  (Ctrl-C to stop)")
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        engine.dispose()


if __name__ == "__main__":
    main()
