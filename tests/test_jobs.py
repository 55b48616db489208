"""Job keying, idempotent queueing, life cycle, recovery, supersede and send bookkeeping."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from dicom_node import db
from dicom_node.db import Job, JobState, Series, SeriesState, Study
from dicom_node.jobs import (
    InvalidTransition,
    acknowledged,
    claim,
    next_queued,
    queue_job,
    record_ack,
    recover_interrupted,
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


def test_recovery_moves_running_back_to_queued(session_factory, series):
    with session_factory() as s:
        job, _ = _queue(s, series)
        s.commit()
        assert claim(s, job.id)
        s.commit()
        assert not claim(s, job.id)  # already running: a second worker cannot take it
        s.refresh(job)
        assert job.state is JobState.running and job.attempts == 1
    with session_factory() as s:  # "restart"
        assert recover_interrupted(s) == [job.id]
        s.commit()
        job = s.get(Job, job.id)
        assert job.state is JobState.queued and "interrupted" in job.reason


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
