"""Job keying, idempotent queueing, life cycle, recovery, supersede and send bookkeeping."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from dicom_node import db
from dicom_node.db import Job, JobState, Series, SeriesState, Study
from dicom_node.jobs import (
    InvalidTransition,
    acknowledged,
    claim,
    claim_next,
    claim_send,
    next_queued,
    queue_job,
    reap_expired,
    reclaim_own,
    record_ack,
    release,
    renew,
    requeue,
    transition,
)
from dicom_node.uids import instances_hash
from tests.support.postgres import DATABASE_KINDS


@pytest.fixture(params=DATABASE_KINDS)
def db_kind(request) -> str:
    return request.param


@pytest.fixture
def session_factory(database_url):
    url = database_url
    db.upgrade(url)
    engine = db.make_engine(url)
    yield db.make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def series(session_factory):
    with session_factory() as s:
        study = Study(study_uid="1.2.3")
        ser = Series(series_uid="1.2.3.4", study=study, modality="CT", state=SeriesState.complete)
        s.add_all([study, ser])
        s.commit()
        return ser


UIDS = ["1.2.3.4.5.3", "1.2.3.4.5.1", "1.2.3.4.5.2"]


def _queue(s, series, uids=UIDS, factor=2, version="v1", priority=0):
    ser = s.get(Series, series.id)
    return queue_job(
        s,
        series=ser,
        sop_uids=uids,
        model_id="acvtt-compact",
        model_version=version,
        factor=factor,
        priority=priority,
    )


def test_instances_hash_is_order_independent():
    assert instances_hash(UIDS) == instances_hash(sorted(UIDS)) == instances_hash(UIDS + UIDS[:1])
    assert instances_hash(UIDS) != instances_hash(UIDS[:2])
    assert len(instances_hash(UIDS)) == 64


def test_queue_is_idempotent(session_factory, series):
    with session_factory() as s:
        job, created = _queue(s, series)
        s.commit()
        again, created2 = _queue(s, series, uids=list(reversed(UIDS)))
        s.commit()
        assert created and not created2 and again.id == job.id
        assert s.scalar(select(func.count()).select_from(Job)) == 1
        assert job.state is JobState.queued
        assert job.source_sop_uids == sorted(UIDS)


def test_key_includes_model_and_factor(session_factory, series):
    with session_factory() as s:
        a, _ = _queue(s, series)
        b, created_b = _queue(s, series, factor=3)
        c, created_c = _queue(s, series, version="v2")
        s.commit()
        assert created_b and created_c and len({a.id, b.id, c.id}) == 3


def test_late_arrival_supersedes_previous_job(session_factory, series):
    with session_factory() as s:
        first, _ = _queue(s, series)
        s.commit()
        second, created = _queue(s, series, uids=[*UIDS, "1.2.3.4.5.4"])
        s.commit()
        assert created and second.supersedes_job_id == first.id
        assert first.supersedes_job_id is None


def test_restart_takes_back_only_its_own_running_jobs(session_factory, series):
    with session_factory() as s:
        mine, _ = _queue(s, series)
        theirs, _ = _queue(s, series, factor=3)
        s.commit()
        assert claim(s, mine.id, "node-a", 60)
        assert claim(s, theirs.id, "node-b", 60)
        s.commit()
        assert not claim(s, mine.id, "node-b", 60)  # already running: nobody else takes it
        s.refresh(mine)
        assert mine.state is JobState.running and mine.attempts == 1
        assert mine.claimed_by == "node-a" and mine.lease_expires_at > db.utcnow()
    with session_factory() as s:  # node-a restarts; node-b lives on
        assert reclaim_own(s, "node-a") == [mine.id]
        s.commit()
        mine, theirs = s.get(Job, mine.id), s.get(Job, theirs.id)
        assert mine.state is JobState.queued and "interrupted" in mine.reason
        assert mine.claimed_by is None and mine.lease_expires_at is None
        assert theirs.state is JobState.running and theirs.claimed_by == "node-b"


def test_reaper_requeues_only_expired_leases_and_a_heartbeat_keeps_one(session_factory, series):
    with session_factory() as s:
        a, _ = _queue(s, series)
        b, _ = _queue(s, series, factor=3)
        s.commit()
        assert claim(s, a.id, "node-a", 60) and claim(s, b.id, "node-b", 60)
        s.commit()
    later = db.utcnow() + timedelta(seconds=45)
    with session_factory() as s:
        assert reap_expired(s, now=later) == []  # both leases still run
        # node-b's heartbeat: it holds only its own job, now for 120 s from here
        assert renew(s, "node-b", [a.id, b.id], 120) == {b.id}
        s.commit()
        assert reap_expired(s, now=db.utcnow() + timedelta(seconds=61)) == [a.id]
        s.commit()
        a, b = s.get(Job, a.id), s.get(Job, b.id)
        assert a.state is JobState.queued and "lease expired" in a.reason
        assert b.state is JobState.running
        assert renew(s, "node-a", [a.id], 60) == set()  # node-a's lease is gone for good


@pytest.mark.parametrize("concurrent", [False, True])
def test_claim_next_hands_each_job_to_one_node(session_factory, series, concurrent):
    if concurrent and session_factory.kw["bind"].dialect.name == "sqlite":
        pytest.skip("SQLite has one writer: a second claim waits for the first to commit")
    with session_factory() as s:
        ids = [_queue(s, series, factor=f)[0].id for f in (2, 3, 4, 5)]
        s.commit()
    first, second = session_factory(), session_factory()
    try:
        got_a = claim_next(first, "node-a", 60, 3)
        if not concurrent:
            first.commit()
        # ``concurrent``: node-a's claim is not committed yet; PostgreSQL skips its locked rows
        # instead of waiting for them or handing them out twice
        got_b = claim_next(second, "node-b", 3, 3)
        first.commit()
        second.commit()
    finally:
        first.close()
        second.close()
    assert len(got_a) == 3 and len(got_b) == 1
    assert sorted(got_a + got_b) == sorted(ids)
    with session_factory() as s:
        owners = {j.id: j.claimed_by for j in s.scalars(select(Job))}
        assert [owners[i] for i in got_a] == ["node-a"] * 3 and owners[got_b[0]] == "node-b"
        claims = s.scalars(select(db.AuditEvent).where(db.AuditEvent.kind == "job_claimed"))
        assert len(claims.all()) == 4


def test_a_send_is_claimed_by_one_node_at_a_time(session_factory, series):
    with session_factory() as s:
        job, _ = _queue(s, series)
        assert claim(s, job.id, "node-a", 60)
        transition(s, job, JobState.written)
        s.commit()
        assert job.lease_expires_at is None  # written and not being sent: nobody holds it
        assert claim_send(s, job.id, "node-a", 60)
        s.commit()
        assert not claim_send(s, job.id, "node-b", 60)
        assert renew(s, "node-a", [job.id], 60) == {job.id}  # a long send keeps its claim
        release(s, job.id, "node-a")
        s.commit()
        assert claim_send(s, job.id, "node-b", 60)
        s.commit()


def test_transitions_follow_the_life_cycle(session_factory, series):
    with session_factory() as s:
        job, _ = _queue(s, series)
        with pytest.raises(InvalidTransition):
            transition(s, job, JobState.sent)
        transition(s, job, JobState.running)
        transition(s, job, JobState.failed, "decoder exploded")
        assert job.reason == "decoder exploded"
        requeue(s, job, "reprocess requested")
        assert job.state is JobState.queued
        s.commit()


def test_priority_ordering(session_factory, series):
    with session_factory() as s:
        low, _ = _queue(s, series, factor=2, priority=0)
        high, _ = _queue(s, series, factor=3, priority=10)
        mid, _ = _queue(s, series, factor=4, priority=5)
        s.commit()
        assert [j.id for j in next_queued(s, 10)] == [high.id, mid.id, low.id]


def test_only_unacknowledged_instances_are_pending(session_factory, series):
    with session_factory() as s:
        job, _ = _queue(s, series)
        record_ack(s, job, "pacs", "9.1", 0)
        record_ack(s, job, "pacs", "9.1", 0)  # idempotent
        record_ack(s, job, "other", "9.2", 0)
        s.commit()
        done = acknowledged(s, job, "pacs")
        assert [u for u in ["9.1", "9.2", "9.3"] if u not in done] == ["9.2", "9.3"]
        requeue(s, job, "force", forget_sent=True)
        s.commit()
        done = acknowledged(s, job, "pacs")
        assert [u for u in ["9.1", "9.2"] if u not in done] == ["9.1", "9.2"]


def test_a_rolled_back_queueing_leaves_no_job(session_factory, series):
    # Completion queues a job, then finds that the series changed meanwhile and rolls back:
    # the job must go too (with sqlite3 a SAVEPOINT used to commit it, and a partial series
    # was processed).
    with session_factory() as s:
        s.scalars(select(Series)).all()  # the transaction has only read so far
        job, created = _queue(s, series)
        assert created and job.id is not None and job.source_sop_uids == sorted(UIDS)
        s.rollback()
    with session_factory() as s:
        assert s.scalar(select(func.count(Job.id))) == 0


def test_queueing_the_same_key_twice_returns_the_first(session_factory, series):
    with session_factory() as s:
        first, created = _queue(s, series)
        again, created_again = _queue(s, series)
        s.commit()
        assert created and not created_again and again.id == first.id
