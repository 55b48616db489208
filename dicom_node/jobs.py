"""Jobs: one ACVTT run over one exact instance set of a source series, kept in the database.

Key: ``(source series UID, sha256 of its sorted SOP Instance UIDs, model id, model version,
factor)``, unique in the ``jobs`` table, so queueing the same input twice returns the existing job
(:func:`queue_job` is idempotent, also under a race: the loser's insert fails on the constraint
and it reads the winner's row).

States::

    queued -> running -> written -> sent
       \\________\\_________\\-------> failed (dead letter, reason kept)
    queued/running -> rejected (input unusable, reason kept)

``running`` jobs found at start-up were interrupted by a crash and go back to ``queued``
(:func:`recover_interrupted`). A job for a new instance set of a series that already had a job
*supersedes* the latest earlier one (``supersedes_job_id``). Send bookkeeping is per destination
and SOP instance (:class:`~dicom_node.db.SentInstance`), so a resend only sends what no
destination has acknowledged yet.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_node.db import Job, JobState, SentInstance, Series, audit, utcnow

__all__ = [
    "InvalidTransition",
    "JobKey",
    "acknowledged",
    "claim",
    "instances_hash",
    "job_key",
    "pending_instances",
    "queue_job",
    "record_ack",
    "recover_interrupted",
    "requeue",
    "schedule_send_retry",
    "transition",
]

log = logging.getLogger(__name__)

ALLOWED: dict[JobState, set[JobState]] = {
    JobState.queued: {JobState.running, JobState.failed, JobState.rejected},
    JobState.running: {JobState.written, JobState.failed, JobState.rejected, JobState.queued},
    JobState.written: {JobState.sent, JobState.failed, JobState.queued},
    JobState.sent: {JobState.queued, JobState.written},
    JobState.failed: {JobState.queued, JobState.written},
    JobState.rejected: {JobState.queued},
}


class InvalidTransition(ValueError):
    """A state change that the job life cycle does not allow."""


def instances_hash(sop_instance_uids: Iterable[str]) -> str:
    """sha256 (hex) of the sorted, unique SOP Instance UIDs joined by newlines."""
    return hashlib.sha256("\n".join(sorted(set(sop_instance_uids))).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class JobKey:
    source_series_uid: str
    instances_hash: str
    model_id: str
    model_version: str
    factor: int


def job_key(
    series_uid: str, sop_uids: Iterable[str], model_id: str, model_version: str, factor: int
) -> JobKey:
    return JobKey(series_uid, instances_hash(sop_uids), model_id, model_version, int(factor))


def _find(session: Session, key: JobKey) -> Job | None:
    return session.scalars(
        select(Job).where(
            Job.source_series_uid == key.source_series_uid,
            Job.instances_hash == key.instances_hash,
            Job.model_id == key.model_id,
            Job.model_version == key.model_version,
            Job.factor == key.factor,
        )
    ).first()


def queue_job(
    session: Session,
    *,
    series: Series,
    sop_uids: Iterable[str],
    model_id: str,
    model_version: str,
    factor: int,
    rule_name: str | None = None,
    destinations: Iterable[str] = (),
    priority: int = 0,
    summary: dict | None = None,
) -> tuple[Job, bool]:
    """Queue a job for this exact input, or return the existing one. ``(job, created)``.

    A new job records the series' latest earlier job (other instance set, model or factor) in
    ``supersedes_job_id``. The caller commits.
    """
    sop_uids = sorted(set(sop_uids))
    key = job_key(series.series_uid, sop_uids, model_id, model_version, factor)
    existing = _find(session, key)
    if existing is not None:
        return existing, False
    previous = session.scalars(
        select(Job).where(Job.source_series_uid == series.series_uid).order_by(Job.id.desc())
    ).first()
    job = Job(
        series_id=series.id,
        source_series_uid=key.source_series_uid,
        instances_hash=key.instances_hash,
        model_id=model_id,
        model_version=model_version,
        factor=key.factor,
        rule_name=rule_name,
        destinations=list(destinations),
        priority=priority,
        state=JobState.queued,
        supersedes_job_id=previous.id if previous is not None else None,
        stage_seconds={},
        summary={**(summary or {}), "source_sop_uids": sop_uids},
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        # Someone queued the same key between our lookup and insert: theirs wins.
        existing = _find(session, key)
        if existing is None:  # pragma: no cover - the constraint fired, so the row exists
            raise
        return existing, False
    audit(
        session,
        "job_queued",
        series_uid=series.series_uid,
        job_id=job.id,
        detail={
            "factor": key.factor,
            "model_id": model_id,
            "model_version": model_version,
            "supersedes": job.supersedes_job_id,
        },
    )
    log.info(
        "job queued job_id=%s series_uid=%s factor=%d supersedes=%s",
        job.id,
        series.series_uid,
        key.factor,
        job.supersedes_job_id,
    )
    return job, True


def transition(
    session: Session, job: Job, new: JobState, reason: str | None = None, **fields: object
) -> Job:
    """Move ``job`` to ``new`` (checked against the life cycle), recording ``reason``.

    Extra ``fields`` are set on the job. The caller commits.
    """
    if new != job.state and new not in ALLOWED[job.state]:
        raise InvalidTransition(f"job {job.id}: {job.state.value} -> {new.value} is not allowed")
    old = job.state
    job.state = new
    if reason is not None or new in (JobState.queued, JobState.running):
        job.reason = reason
    for k, v in fields.items():
        setattr(job, k, v)
    job.updated_at = utcnow()
    audit(
        session,
        f"job_{new.value}",
        series_uid=job.source_series_uid,
        job_id=job.id,
        detail={"from": old.value, "reason": reason} if reason else {"from": old.value},
    )
    return job


def claim(session: Session, job_id: int) -> bool:
    """Atomically move a queued job to running (attempts + 1). False if someone else did."""
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.queued)
        .values(state=JobState.running, attempts=Job.attempts + 1, updated_at=utcnow())
    )
    return res.rowcount == 1


def next_queued(session: Session, limit: int) -> list[Job]:
    """Queued jobs in dispatch order: highest priority first, then oldest."""
    return list(
        session.scalars(
            select(Job)
            .where(Job.state == JobState.queued)
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(limit)
        )
    )


def recover_interrupted(session: Session) -> list[int]:
    """At start-up: every ``running`` job was interrupted by a crash; queue it again."""
    jobs = session.scalars(select(Job).where(Job.state == JobState.running)).all()
    for job in jobs:
        transition(session, job, JobState.queued, "requeued at start-up: interrupted while running")
    return [j.id for j in jobs]


def requeue(session: Session, job: Job, reason: str, *, forget_sent: bool = False) -> Job:
    """Queue an existing job again (reprocess). ``forget_sent`` drops its acknowledgement records
    so that every derived instance is sent again (same UIDs, so PACS replaces, never duplicates)."""
    if forget_sent:
        session.execute(delete(SentInstance).where(SentInstance.job_id == job.id))
    return transition(session, job, JobState.queued, reason, next_send_at=None, send_attempts=0)


# --- send bookkeeping -------------------------------------------------------------------------


def acknowledged(session: Session, job: Job, destination: str) -> set[str]:
    """SOP Instance UIDs of ``job`` that ``destination`` acknowledged."""
    return set(
        session.scalars(
            select(SentInstance.sop_instance_uid).where(
                SentInstance.job_id == job.id, SentInstance.destination == destination
            )
        )
    )


def pending_instances(
    session: Session, job: Job, destination: str, all_uids: Iterable[str]
) -> list[str]:
    """The UIDs (in the given order) that ``destination`` has not acknowledged yet."""
    done = acknowledged(session, job, destination)
    return [u for u in all_uids if u not in done]


def record_ack(session: Session, job: Job, destination: str, sop_uid: str, status: int) -> None:
    """Remember that ``destination`` acknowledged ``sop_uid`` (idempotent). The caller commits."""
    exists = session.scalars(
        select(SentInstance.id).where(
            SentInstance.job_id == job.id,
            SentInstance.destination == destination,
            SentInstance.sop_instance_uid == sop_uid,
        )
    ).first()
    if exists is None:
        session.add(
            SentInstance(
                job_id=job.id, destination=destination, sop_instance_uid=sop_uid, status=status
            )
        )


def schedule_send_retry(
    session: Session, job: Job, delay_s: float, reason: str, now: datetime | None = None
) -> None:
    """Record a transient send failure; the send loop tries again after ``delay_s``."""
    job.next_send_at = (now or utcnow()) + timedelta(seconds=delay_s)
    job.reason = reason
    audit(
        session,
        "send_retry_scheduled",
        series_uid=job.source_series_uid,
        job_id=job.id,
        detail={"delay_s": round(delay_s, 2), "reason": reason, "attempt": job.send_attempts},
    )
