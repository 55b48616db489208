"""Scale-out with real processes: receivers and workers on one PostgreSQL and one spool (issue 12).

Every node is a real ``dicom-node serve`` (tests/support/node.py) with its own ``node.id`` and
role, all sharing the test run's private PostgreSQL cluster (tests/support/postgres.py) and one
spool directory; dcmtk's ``storescu`` sends small real series (``half_size_series``), and
Orthanc is the PACS. A worker has no DICOM port: it is ready when its ``/readyz`` says so (the
model is loaded).

- A worker that cannot read a source file (removed from the spool, or a directory in its
  place: both stop root too, unlike ``chmod 000``) fails that job with a reason that names the
  problem and the spool, never the patient, and carries on with the next series.
- Two receivers and two workers, four series, one of them arriving half over each receiver at
  the same time: each series gets one job that runs once, both workers run some, and Orthanc
  holds exactly four derived series with the right instance counts.
- Nodes starting at once on a new database all get the schema (they take turns upgrading it).

``WorkerProcess`` and ``node_config`` serve benchmarks/workers.py too.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
import requests
import sqlalchemy as sa

from dicom_node import db
from tests.support.dcmtk import free_port
from tests.support.node import NodeProcess, half_size_series, send_with_storescu
from tests.support.orthanc import OrthancServer
from tests.support.polling import wait_until

pytestmark = pytest.mark.slow

SLICES = 8  # per series: enough for a real stack, a few seconds of CPU inference at half size
FINAL = ("sent", "failed", "rejected")


class WorkerProcess(NodeProcess):
    """A ``serve --role worker`` node: no DICOM port, so it is ready when ``/readyz`` answers
    200 (database, spool and the loaded model) on its own HTTP port."""

    def __init__(self, directory: Path, overrides: dict) -> None:
        self.http_port = free_port()
        http = {"http": {"enabled": True, "bind_address": "127.0.0.1", "port": self.http_port}}
        super().__init__(directory, overrides={**overrides, **http})

    def ready_echo(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            url = f"http://127.0.0.1:{self.http_port}/readyz"
            ready = requests.get(url, timeout=timeout).status_code == 200
        except requests.RequestException:
            ready = False
        return subprocess.CompletedProcess([], 0 if ready else 1, "", "")


def node_config(node_id: str, role: str, url: str, spool: Path, destinations: list[dict]) -> dict:
    return {
        "node": {"id": node_id, "role": role, "lease_s": 10},
        "storage": {"spool_dir": str(spool)},
        "database": {"url": url},
        "destinations": destinations,
        # Long enough that a series sent over two receivers at once is one series when it is
        # checked, short enough to keep the test quick.
        "completion": {"quiet_seconds": 3, "check_interval_s": 0.5},
        "rules": [
            {
                "name": "thick-ct",
                "match": {"modality": ["CT"], "spacing_mm": [1.5, 10]},
                "action": {
                    "target_spacing_mm": 1.0,
                    "destinations": [d["name"] for d in destinations],
                },
            }
        ],
        "model": {"device": "cpu"},
    }


def _sources(sample_data) -> list[Path]:
    return sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm"))


def _series_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _jobs(engine: sa.Engine) -> dict[str, dict]:
    """Every job by its source series UID (a second job of one series fails the test)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "select id, source_series_uid, state, reason, claimed_by, attempts, factor,"
                " source_sop_uids, derived_series_uid, summary from jobs order by id"
            )
        ).all()
    out: dict[str, dict] = {}
    for row in rows:
        job = dict(row._mapping)
        assert job["source_series_uid"] not in out, f"two jobs for one series: {rows}"
        out[job["source_series_uid"]] = job
    return out


def _audit_count(engine: sa.Engine, kind: str, job_id: int) -> int:
    with engine.connect() as conn:
        return conn.execute(
            sa.text("select count(*) from audit_events where kind = :k and job_id = :j"),
            {"k": kind, "j": job_id},
        ).scalar_one()


def _all_final(engine: sa.Engine, n: int) -> dict[str, dict] | None:
    jobs = _jobs(engine)
    return jobs if len(jobs) == n and all(j["state"] in FINAL for j in jobs.values()) else None


# -- a worker that cannot read a source file ---------------------------------------------------


def test_a_worker_that_cannot_read_a_source_file_fails_that_job_and_carries_on(
    tmp_path, sample_data, postgres_cluster
):
    """The receiver queues three series; then one source file of the first is removed from the
    spool and one of the second replaced by a directory (what a worker sees when the shared
    spool is not mounted, or a file is missing on it), and only then does the worker start.
    Both jobs fail with a reason naming the problem; the third series is still processed."""
    url = postgres_cluster.create_database()
    spool = tmp_path / "spool"
    engine = db.make_engine(url)
    sources = _sources(sample_data)
    names = ("removed", "directory", "fine")
    series = {
        n: half_size_series(sources, tmp_path / n, seed=f"spool-{n}", n=SLICES) for n in names
    }
    uids = {n: _series_uid(files[0]) for n, files in series.items()}
    receiver = NodeProcess(tmp_path / "rx", overrides=node_config("rx", "receiver", url, spool, []))
    worker = WorkerProcess(tmp_path / "wk", node_config("wk", "worker", url, spool, []))
    try:
        receiver.start()
        for files in series.values():
            assert send_with_storescu(files, receiver.port).acknowledged == set(files)
        wait_until(lambda: len(_jobs(engine)) == 3, 120, "three queued jobs")
        with engine.connect() as conn:
            path_of = dict(
                conn.execute(
                    sa.text(
                        "select s.series_uid, i.file_path from instances i"
                        " join series s on s.id = i.series_id order by i.instance_number"
                    )
                ).all()
            )  # the last instance of each series: a slice in the middle of nowhere special
        (spool / path_of[uids["removed"]]).unlink()
        broken = spool / path_of[uids["directory"]]
        broken.unlink()
        broken.mkdir()
        worker.start(timeout=120)
        jobs = wait_until(lambda: _all_final(engine, 3), 240, "all three jobs to finish")
        assert worker.running, worker.log_tail()
    finally:
        for node in (worker, receiver):
            node.kill()
        engine.dispose()

    removed, directory, fine = (jobs[uids[n]] for n in names)
    assert fine["state"] == "sent", (fine, worker.log_tail())
    patient = pydicom.dcmread(sources[0], stop_before_pixels=True)
    for job, why in ((removed, "No such file or directory"), (directory, "Is a directory")):
        assert job["state"] == "failed", job
        reason = job["reason"]
        print(reason)
        assert why in reason and "cannot be read on node wk" in reason, reason
        assert str(spool.resolve()) in reason and "shared spool" in reason, reason
        for value in (str(patient.get("PatientName", "")), str(patient.get("PatientID", ""))):
            assert not value or value not in reason, reason
    # Not the series' fault: it stays complete (not rejected), so a reprocess can run it once
    # the spool is back.
    with engine.connect() as conn:
        states = dict(conn.execute(sa.text("select series_uid, state from series")).all())
    assert states[uids["removed"]] == "complete" and states[uids["directory"]] == "complete"
    assert "Traceback" not in worker.log_path.read_text()


# -- two receivers, two workers, four series ---------------------------------------------------


def test_two_receivers_two_workers_four_series_each_processed_exactly_once(
    tmp_path, sample_data, postgres_cluster
):
    """Series A arrives half over each receiver at the same time; B and D go to the first
    receiver, C to the second, all five associations at once. Each worker runs one job at a
    time (``model.concurrency`` is 1 on a CPU) and one job takes seconds, several dispatch
    intervals (1 s): once the jobs are queued each worker's next dispatch pass finds one, so
    both run some without any test hook."""
    url = postgres_cluster.create_database()
    spool = tmp_path / "shared-spool"
    engine = db.make_engine(url)
    sources = _sources(sample_data)
    series = {
        n: half_size_series(sources, tmp_path / n, seed=f"scale-{n}", n=SLICES) for n in "ABCD"
    }
    uids = {n: _series_uid(files[0]) for n, files in series.items()}
    with OrthancServer(tmp_path / "orthanc", aet="PACS") as pacs:
        pacs_dest = [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}
        ]
        receivers = [
            NodeProcess(tmp_path / n, overrides=node_config(n, "receiver", url, spool, pacs_dest))
            for n in ("rx-1", "rx-2")
        ]
        workers = [
            WorkerProcess(tmp_path / n, node_config(n, "worker", url, spool, pacs_dest))
            for n in ("wk-1", "wk-2")
        ]
        nodes = [*receivers, *workers]
        try:
            t0 = time.monotonic()
            with ThreadPoolExecutor(len(nodes)) as pool:  # in parallel: each loads torch
                list(pool.map(lambda node: node.start(timeout=120), nodes))
            print(f"four nodes ready in {time.monotonic() - t0:.1f} s")
            rx1, rx2 = (r.port for r in receivers)
            a = series["A"]
            sends = [(a[0::2], rx1), (a[1::2], rx2), (series["B"], rx1), (series["C"], rx2),
                     (series["D"], rx1)]  # fmt: skip
            with ThreadPoolExecutor(len(sends)) as pool:
                results = list(pool.map(lambda s: send_with_storescu(*s), sends))
            for (files, _), result in zip(sends, results, strict=True):
                assert result.acknowledged == set(files), result.output[-2000:]
            t0 = time.monotonic()
            jobs = wait_until(lambda: _all_final(engine, 4), 300, "four finished jobs", 1)
            print(f"four series received, processed and sent in {time.monotonic() - t0:.1f} s")
            for node in nodes:
                assert node.running, node.log_tail()
            derived = {
                s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"])
                for s in (pacs.get(f"/series/{sid}") for sid in pacs.get("/series"))
            }
        finally:
            for node in nodes:
                node.kill()
            engine.dispose()

    assert set(jobs) == set(uids.values()), jobs.keys()
    for name, uid in uids.items():
        job = jobs[uid]
        assert job["state"] == "sent", (name, job, [w.log_tail() for w in workers])
        # run once: one claim, one attempt, queued once (never a second, partial job)
        assert job["attempts"] == 1, job
        assert _audit_count(engine, "job_claimed", job["id"]) == 1, job
        assert _audit_count(engine, "job_written", job["id"]) == 1, job
        assert len(job["source_sop_uids"]) == SLICES, (name, job["source_sop_uids"])
        n_out = (SLICES - 1) * job["factor"] + 1
        assert derived.get(job["derived_series_uid"]) == n_out, (name, derived, job)
    assert len(derived) == 4, derived
    print({name: jobs[uid]["claimed_by"] for name, uid in uids.items()})
    assert {j["claimed_by"] for j in jobs.values()} == {"wk-1", "wk-2"}, jobs
    with engine.connect() as conn:
        queued_a = conn.execute(
            sa.text(
                "select count(*) from audit_events where kind = 'job_queued' and series_uid = :u"
            ),
            {"u": uids["A"]},
        ).scalar_one()
    assert queued_a == 1  # the split series was completed once, with all its instances


# -- nodes starting at once --------------------------------------------------------------------


def test_nodes_starting_at_once_on_an_empty_database_all_get_the_schema(postgres_cluster):
    """Every node upgrades the schema when it starts; several starting together on a new
    database (a first installation, all started by one playbook) used to collide on the tables
    they all created (``duplicate key value violates unique constraint
    "pg_type_typname_nsp_index"``) and all but one exited. Four upgrades at once, three times."""
    for _ in range(3):
        url = postgres_cluster.create_database()
        # Processes, as nodes are (alembic's context is one per process, not per thread).
        code = "import sys; from dicom_node import db; db.upgrade(sys.argv[1])"
        procs = [
            subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, errors
        engine = db.make_engine(url)
        try:
            with engine.connect() as conn:
                versions = conn.execute(sa.text("select version_num from alembic_version")).all()
        finally:
            engine.dispose()
        assert len(versions) == 1, versions
