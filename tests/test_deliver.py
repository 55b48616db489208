"""Delivery decisions (a pure function, hand-made cases), batched acknowledgements, the
current-reason rule, and the health record of the unattended loops."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from datetime import datetime, timedelta

import pytest

from dicom_node import db
from dicom_node.db import Job, JobState, SentInstance, Series, Study
from dicom_node.deliver import AckRecorder, AttemptResult, RetryPolicy, decide
from dicom_node.health import Health
from dicom_node.jobs import acknowledged, queue_job, schedule_send_retry, transition
from dicom_node.send import FailureKind
from tests.support.postgres import both_databases

T0 = datetime(2026, 12, 2, 3, 0, 0)
POLICY = RetryPolicy(base_delay_s=2, max_delay_s=300, retry_window_s=4 * 3600)


def _transient(reason: str = "pacs: cannot connect") -> AttemptResult:
    a = AttemptResult()
    a.add_failure(FailureKind.TRANSIENT, reason)
    return a


def test_success_is_sent():
    step = decide(AttemptResult(), attempts_so_far=3, failing_since=T0, now=T0, policy=POLICY)
    assert step.state is JobState.sent and step.retry_in_s is None


def test_permanent_fails_at_once_even_with_a_transient_one():
    a = _transient()
    a.add_failure(FailureKind.PERMANENT, "other: answered 0xA700")
    a.add_failure(FailureKind.TRANSIENT, "third: timeout")  # never downgrades a permanent one
    step = decide(a, attempts_so_far=1, failing_since=None, now=T0, policy=POLICY)
    assert step.state is JobState.failed
    assert step.reason.startswith("send failed permanently: ") and "0xA700" in step.reason


def test_transient_retries_for_hours_not_attempts():
    rng = random.Random(3)
    # 100 attempts into a 3-hour outage: still retried, the delay capped at max_delay_s.
    step = decide(
        _transient(),
        attempts_so_far=100,
        failing_since=T0,
        now=T0 + timedelta(hours=3),
        policy=POLICY,
        rng=rng,
    )
    assert step.state is JobState.written
    assert 150 <= step.retry_in_s <= 300 and "cannot connect" in step.reason


def test_transient_gives_up_at_the_end_of_the_window():
    step = decide(
        _transient(),
        attempts_so_far=60,
        failing_since=T0,
        now=T0 + timedelta(hours=4, seconds=1),
        policy=POLICY,
    )
    assert step.state is JobState.failed
    assert "gave up after 4.0 h of failures (60 attempts)" in step.reason


def test_the_last_retry_lands_at_the_end_of_the_window():
    step = decide(
        _transient(),
        attempts_so_far=40,
        failing_since=T0,
        now=T0 + timedelta(hours=4) - timedelta(seconds=10),
        policy=POLICY,
        rng=random.Random(1),
    )
    assert step.state is JobState.written and step.retry_in_s == pytest.approx(10, abs=0.01)


def test_first_transient_failure_starts_the_clock_now():
    step = decide(_transient(), attempts_so_far=1, failing_since=None, now=T0, policy=POLICY)
    assert step.state is JobState.written and 1 <= step.retry_in_s <= 2


def test_optional_attempt_cap():
    policy = RetryPolicy(retry_window_s=86400, max_attempts=5)
    step = decide(_transient(), attempts_so_far=5, failing_since=T0, now=T0, policy=policy)
    assert step.state is JobState.failed and "after 5 attempts" in step.reason


@pytest.fixture
def sessions(database_url, tmp_path):
    url = database_url
    db.upgrade(url)
    engine = db.make_engine(url, busy_timeout_ms=200)
    yield db.make_session_factory(engine), tmp_path / "node.db"
    engine.dispose()


@pytest.fixture
def job_id(sessions):
    factory, _ = sessions
    with factory() as s:
        study = Study(study_uid="1.2.3")
        s.add(study)
        s.flush()
        series = Series(series_uid="1.2.3.4", study_id=study.id)
        s.add(series)
        s.flush()
        job, _ = queue_job(
            s, series=series, sop_uids=["9.1"], model_id="m", model_version="1", factor=2
        )
        s.commit()
        return job.id


@both_databases
def test_acks_are_committed_in_batches_while_the_send_runs(sessions, job_id):
    factory, _ = sessions
    rec = AckRecorder(factory, job_id, "pacs", batch=3, flush_s=3600)
    rec.add("9.1", 0)
    rec.add("9.2", 0)
    with factory() as s:
        assert acknowledged(s, s.get(Job, job_id), "pacs") == set()  # not yet a batch
    rec.add("9.3", 0xB000)
    with factory() as s:
        assert acknowledged(s, s.get(Job, job_id), "pacs") == {"9.1", "9.2", "9.3"}
    assert rec.committed == 3


@both_databases
def test_acks_flush_after_the_interval(sessions, job_id):
    factory, _ = sessions
    rec = AckRecorder(factory, job_id, "pacs", batch=1000, flush_s=0.0)
    rec.add("9.1", 0)
    with factory() as s:
        assert acknowledged(s, s.get(Job, job_id), "pacs") == {"9.1"}


@contextlib.contextmanager
def _database_locked(factory, sqlite_path):
    """Another connection holds what an acknowledgement needs: SQLite's write lock, or on
    PostgreSQL an exclusive lock on sent_instances (the engine's lock_timeout then gives up)."""
    engine = factory.kw["bind"]
    if engine.dialect.name == "sqlite":
        locker = sqlite3.connect(sqlite_path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        return
    with engine.connect() as conn:
        conn.exec_driver_sql("LOCK TABLE sent_instances IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.rollback()


@both_databases
def test_acks_the_database_refused_are_kept_for_the_next_flush(sessions, job_id):
    factory, path = sessions
    rec = AckRecorder(factory, job_id, "pacs", batch=1, flush_s=3600)
    with _database_locked(factory, path):  # another process holds the write lock
        rec.add("9.1", 0)  # the flush fails; the send must go on
        assert rec.committed == 0
    assert rec.flush() and rec.committed == 1
    with factory() as s:
        rows = s.query(SentInstance).filter_by(job_id=job_id).all()
        assert [(r.sop_instance_uid, r.status) for r in rows] == [("9.1", 0)]


@both_databases
def test_a_sent_job_does_not_keep_the_reason_of_its_last_failure(sessions, job_id):
    factory, _ = sessions
    with factory() as s:
        job = s.get(Job, job_id)
        transition(s, job, JobState.running)
        transition(s, job, JobState.written)
        schedule_send_retry(s, job, 5.0, "pacs: cannot connect", now=T0)
        assert job.reason == "retrying: pacs: cannot connect"
        assert job.send_failing_since == T0
        transition(s, job, JobState.sent, None)
        assert job.reason is None
        s.commit()
        kinds = [e.kind for e in s.query(db.AuditEvent).order_by(db.AuditEvent.id)]
        assert "send_retry_scheduled" in kinds  # the history keeps it


def test_health_flags_a_stall_and_a_silent_loop():
    now = [1000.0]
    h = Health(stall_after_s=60, clock=lambda: now[0])
    h.register("send", 1.0)
    h.ok("send")
    h.failed("send", "OperationalError: database is locked")
    assert h.snapshot()["healthy"]  # one failure is not a stall
    now[0] += 61
    snap = h.snapshot()
    assert not snap["healthy"] and "send: failing for 61 s" in snap["problems"][0]
    h.ok("send")
    assert h.snapshot()["healthy"]
    now[0] += 200  # no pass completed for 200 s: silent
    assert "no pass completed" in h.snapshot()["problems"][0]


def test_a_server_that_says_when_to_come_back_is_not_asked_sooner():
    a = AttemptResult()
    a.add_failure(FailureKind.TRANSIENT, "web: HTTP 503", retry_after_s=120.0)
    step = decide(a, attempts_so_far=1, failing_since=None, now=T0, policy=POLICY)
    assert step.state is JobState.written and step.retry_in_s == pytest.approx(120.0)
