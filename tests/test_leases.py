"""Several nodes on one database: job claims with leases, roles (issue 12, items 2 and 3).

Two in-process :class:`~dicom_node.scheduler.Pipeline` instances with their own ``node.id``
share one database, one spool and one destination (a recording pynetdicom SCP), as two worker
nodes would. The model is a linear stand-in: these tests are about who runs what, not about
inference. A "dead" node is one whose heartbeat stopped while its worker thread still sits in
the model (as after SIGSTOP or a network cut): its lease runs out, another node takes the job
over, and the stale worker's late result is dropped.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from dicom_node import db
from dicom_node.config import parse_config
from dicom_node.db import AuditEvent, Job, JobState, Series, SeriesState
from dicom_node.infer import ModelPool
from dicom_node.jobs import derived_dir_path, queue_job
from dicom_node.scheduler import Pipeline
from tests.support.polling import wait_until
from tests.support.postgres import DATABASE_KINDS
from tests.test_config_errors import base_config, run_cli
from tests.test_pipeline import SCP, LinearStandIn, _free_port, _index

LEASE_S = 3.0  # the shortest the config allows; the reaper runs every second


@pytest.fixture(params=DATABASE_KINDS)
def db_kind(request) -> str:
    return request.param


class GatedStandIn(LinearStandIn):
    """The linear stand-in, but each run waits until ``gate`` is set (or ``delay_s``)."""

    def __init__(self, gate: threading.Event | None = None, delay_s: float = 0.0):
        self.gate, self.delay_s = gate, delay_s
        self.started = threading.Event()
        self.runs = 0

    def interpolate(self, volume, factor, progress=None):
        self.runs += 1
        self.started.set()
        if self.gate is not None:
            self.gate.wait(60)
        elif self.delay_s:
            threading.Event().wait(self.delay_s)
        return super().interpolate(volume, factor, progress)


@pytest.fixture
def cluster(tmp_path, sample_data, database_url):
    """``(make_pipeline, sessions, series_id, scp)``: pipelines share the database and spool."""
    port = _free_port()
    scp = SCP(port)

    def config(node_id: str, quiet_seconds: float = 100000, role: str = "all"):
        return parse_config(  # quiet_seconds: by default the test queues the jobs itself
            {
                "node": {"id": node_id, "lease_s": LEASE_S, "role": role},
                "storage": {"spool_dir": str(tmp_path / "spool"), "retention_days": 0},
                "database": {"url": database_url},
                "completion": {"quiet_seconds": quiet_seconds},
                "rules": [
                    {
                        "name": "thick",
                        "match": {"modality": ["CT"]},
                        "action": {"factor": 2, "destinations": ["pacs"]},
                    }
                ],
                "destinations": [
                    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}
                ],
            }
        )

    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    sessions = db.make_session_factory(engine)
    files = sorted(p for p in Path(sample_data.pydicom_ct5n).iterdir() if p.is_file())
    series_id = _index(sessions, config("setup"), files)
    pipelines: list[Pipeline] = []

    def make_pipeline(node_id: str, model: LinearStandIn, **settings) -> Pipeline:
        cfg = config(node_id, **settings)
        pool = ModelPool(cfg.model, loader=lambda _m: (model, None))
        pipeline = Pipeline(cfg, sessions, models=pool, send_base_delay_s=0.01)
        pipelines.append(pipeline)
        return pipeline

    yield make_pipeline, sessions, series_id, scp
    for p in pipelines:
        p.shutdown()
    scp.stop()
    engine.dispose()


def _queue_jobs(sessions, series_id: int, factors, destinations=("pacs",)) -> list[int]:
    """Jobs for the indexed series. Without ``destinations`` a written job counts as sent at
    once (kept locally): for the tests that are about who runs a job, not about sending."""
    with sessions() as s:
        series = s.get(Series, series_id)
        uids = [i.sop_instance_uid for i in series.instances]
        ids = [
            queue_job(
                s,
                series=series,
                sop_uids=uids,
                model_id=LinearStandIn.model_id,
                model_version=LinearStandIn.model_version,
                factor=f,
                destinations=list(destinations),
            )[0].id
            for f in factors
        ]
        s.commit()
    return ids


def _claims(sessions) -> list[tuple[int, str]]:
    """(job id, node) of every claim, oldest first."""
    with sessions() as s:
        events = s.scalars(
            select(AuditEvent).where(AuditEvent.kind == "job_claimed").order_by(AuditEvent.id)
        ).all()
        return [(e.job_id, e.detail.split('"node": "')[1].split('"')[0]) for e in events]


def _states(sessions, ids) -> dict[int, JobState]:
    with sessions() as s:
        return {j.id: j.state for j in s.scalars(select(Job).where(Job.id.in_(ids)))}


def test_two_nodes_run_each_job_exactly_once_and_share_the_work(cluster):
    make_pipeline, sessions, series_id, scp = cluster
    ids = _queue_jobs(sessions, series_id, [2, 3, 4, 5, 6, 7])
    nodes = [make_pipeline(n, GatedStandIn(delay_s=0.5)) for n in ("node-a", "node-b")]
    for p in nodes:
        p.start()
    wait_until(
        lambda: set(_states(sessions, ids).values()) == {JobState.sent},
        120,
        "every job sent",
    )
    claims = _claims(sessions)
    per_job = Counter(job_id for job_id, _ in claims)
    assert per_job == Counter(ids), claims  # each job claimed (and run) exactly once
    assert {node for _, node in claims} == {"node-a", "node-b"}, claims  # both did some
    with sessions() as s:
        jobs = s.scalars(select(Job).where(Job.id.in_(ids))).all()
        assert all(j.attempts == 1 and j.send_attempts == 1 for j in jobs)
        expected = sum(len(j.derived_files) for j in jobs)
    # no instance was sent twice: each send was claimed by one node
    assert len(scp.received) == expected and len(set(scp.received)) == expected


def test_a_dead_nodes_job_is_reaped_and_done_by_the_other(cluster):
    make_pipeline, sessions, series_id, scp = cluster
    (job_id,) = _queue_jobs(sessions, series_id, [2], destinations=())
    gate = threading.Event()
    stuck = GatedStandIn(gate=gate)
    dead = make_pipeline("node-a", stuck)
    dead.start()
    assert stuck.started.wait(30)  # node-a holds the job and sits in the model
    dead.shutdown()  # its heartbeat stops; its worker thread is still inside the model
    live = make_pipeline("node-b", GatedStandIn())
    live.start()
    wait_until(lambda: _states(sessions, [job_id])[job_id] is JobState.sent, 60, "job sent")
    assert _claims(sessions) == [(job_id, "node-a"), (job_id, "node-b")]
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job.attempts == 2 and job.claimed_by == "node-b"
        reaped = s.scalars(
            select(AuditEvent).where(AuditEvent.kind == "job_queued", AuditEvent.job_id == job_id)
        ).all()
        assert any("lease expired" in (e.detail or "") for e in reaped)
        sent_files = list(job.derived_files)
    folder = derived_dir_path(job, live.config.storage.spool_root)
    written = {f: (folder / f).stat().st_mtime_ns for f in sent_files}
    gate.set()  # the stale worker wakes up: its result must be neither written nor recorded
    wait_until(lambda: not dead._running, 30, "the stale worker to finish")
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job.state is JobState.sent and job.claimed_by == "node-b"
        assert list(job.derived_files) == sent_files
        assert {f: (folder / f).stat().st_mtime_ns for f in sent_files} == written


def test_a_restarting_node_leaves_a_live_nodes_job_alone(cluster):
    """node-a runs a job for longer than three leases (its heartbeat keeps it); node-b starts
    meanwhile: neither its start-up recovery nor its reaper takes the job."""
    make_pipeline, sessions, series_id, scp = cluster
    (job_id,) = _queue_jobs(sessions, series_id, [2], destinations=())
    gate = threading.Event()
    slow = GatedStandIn(gate=gate)
    busy = make_pipeline("node-a", slow)
    busy.start()
    assert slow.started.wait(30)
    restarted = make_pipeline("node-b", GatedStandIn())
    restarted.start()
    threading.Event().wait(3 * LEASE_S + 1)
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job.state is JobState.running and job.claimed_by == "node-a"
        assert job.lease_expires_at > db.utcnow()
    gate.set()
    wait_until(lambda: _states(sessions, [job_id])[job_id] is JobState.sent, 60, "job sent")
    assert _claims(sessions) == [(job_id, "node-a")]
    with sessions() as s:
        assert s.get(Job, job_id).attempts == 1


def test_completion_runs_on_one_node_at_a_time(cluster, db_kind):
    """While another node holds the completion task (PostgreSQL advisory lock), a pass does
    nothing; once it is free, the series is planned and its job queued. SQLite is one machine's
    database: there is nobody to wait for."""
    make_pipeline, sessions, series_id, scp = cluster
    pipeline = make_pipeline("node-a", GatedStandIn(), quiet_seconds=0)
    engine = sessions.kw["bind"]
    with db.one_node_at_a_time(engine, "completion") as other_node:
        assert other_node
        with sessions() as s:
            before = s.get(Series, series_id).state
        pipeline.check_completion()
        with sessions() as s:
            planned = s.get(Series, series_id).state is SeriesState.complete
        assert before is not SeriesState.complete
        assert planned is (db_kind == "sqlite")
        with db.one_node_at_a_time(engine, "cleanup") as cleanup:
            assert cleanup  # another task, another lock
    pipeline.check_completion()
    with sessions() as s:
        assert s.get(Series, series_id).state is SeriesState.complete
        assert len(s.scalars(select(Job)).all()) == 1


def test_a_receiver_queues_and_a_worker_runs(cluster, db_kind):
    """node.role: the receiver's pipeline checks completion and queues the job but never claims
    one; the worker's claims it, runs it and sends it."""
    make_pipeline, sessions, series_id, scp = cluster
    receiver = make_pipeline("rx", GatedStandIn(), quiet_seconds=0, role="receiver")
    worker = make_pipeline("wk", GatedStandIn(), role="worker")
    receiver.start()
    worker.start()
    names = {j.id for j in receiver._scheduler.get_jobs()}
    assert names == {"completion", "cleanup"} and not receiver._threads
    assert {"dispatch", "send", "leases"} <= {j.id for j in worker._scheduler.get_jobs()}
    assert "completion" not in {j.id for j in worker._scheduler.get_jobs()}
    wait_until(
        lambda: (
            (ids := list(_states(sessions, _all_job_ids(sessions)).values()))
            and ids == [JobState.sent]
        ),
        60,
        "the job to be sent",
    )
    assert [node for _, node in _claims(sessions)] == ["wk"]
    with sessions() as s:
        assert s.get(Series, series_id).state is SeriesState.processed


def _all_job_ids(sessions) -> list[int]:
    with sessions() as s:
        return list(s.scalars(select(Job.id)))


def test_serve_refuses_an_unknown_role(tmp_path):
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(base_config(tmp_path)))
    proc = run_cli("serve", "--role", "sender", "--config", str(config), timeout=60)
    assert proc.returncode == 2 and "unknown role 'sender'" in proc.stderr, proc.stderr
