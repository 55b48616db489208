"""Jobs: one ACVTT run over one exact instance set of a source series, kept in the database.

Key: ``(source series UID, sha256 of its sorted SOP Instance UIDs, model id, model version,
factor)``, unique in the ``jobs`` table, so queueing the same input twice returns the existing job
(:func:`queue_job` is idempotent, also under a race: the loser's insert fails on the constraint
and it reads the winner's row).

States::

    queued -> running -> written -> sent
       \\________\\_________\\-------> failed (dead letter, reason kept)
    queued/running -> rejected (input unusable, reason kept)

Claims: several nodes may share one database, so a node takes a job by a *claim* with a
*lease*: :func:`claim_next` moves queued jobs to ``running`` with ``claimed_by`` (the node's
``node.id``) and ``lease_expires_at``; :func:`claim_send` takes a ``written`` job's next send
attempt the same way. The holder's heartbeat (:func:`renew`) extends its leases while it works.
:func:`reap_expired` queues again only ``running`` jobs whose lease ran out (their node died or
was cut off); a node starting up takes back at once the jobs it held itself before it stopped
(:func:`reclaim_own`) and leaves those of live nodes alone.

``job.reason`` is the reason for the *current* state (cleared on every transition that gives
none); every earlier reason stays in the audit trail.

A job for a new instance set of a series that already had a job *supersedes* the latest earlier
one (``supersedes_job_id``). Send bookkeeping is per destination
and SOP instance (:class:`~dicom_node.db.SentInstance`), recorded as acknowledgements arrive
(:func:`record_acks`), so a resend only sends what that destination has not acknowledged yet.

The stages hand each other typed columns, not dict keys: completion writes
``job.source_sop_uids`` (the exact input), the worker writes ``job.derived_files`` (names in
``job.derived_dir``, read by delivery and the CLI). ``job.summary`` is for display only.
``job.derived_dir`` and ``job.preview_path`` are kept relative to the spool root, so that nodes
mounting the shared spool at different paths all find them: read them through
:func:`derived_dir_path`, :func:`derived_paths` and :func:`preview_file`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_node.db import Job, JobState, SentInstance, Series, audit, utcnow
from dicom_node.spool import StoredPathError, from_stored
from dicom_node.uids import instances_hash

__all__ = [
    "InvalidTransition",
    "JobKey",
    "NotPossible",
    "acknowledged",
    "claim",
    "job_key",
    "derived_dir_path",
    "derived_paths",
    "preview_file",
    "queue_job",
    "record_ack",
    "record_acks",
    "claim_next",
    "claim_send",
    "holds",
    "reap_expired",
    "reclaim_own",
    "release",
    "renew",
    "missing_derived",
    "requeue",
    "resend",
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


_KEY_COLUMNS = ["source_series_uid", "instances_hash", "model_id", "model_version", "factor"]


def _insert_unless_queued(session: Session, values: dict) -> bool:
    """Insert a job row unless its key exists (False then), inside the caller's transaction.

    INSERT ... ON CONFLICT DO NOTHING rather than a SAVEPOINT: with Python's sqlite3 driver the
    outermost SAVEPOINT of a transaction that has only read so far is released as a COMMIT, so a
    caller's later rollback (completion found the series changed meanwhile) would leave the job
    behind, and a partial series would be processed.
    """
    dialect = session.get_bind().dialect.name
    if dialect not in ("sqlite", "postgresql"):  # pragma: no cover - the two supported engines
        try:
            with session.begin_nested():
                session.add(Job(**values))
                session.flush()
        except IntegrityError:
            return False
        return True
    insert = sqlite_insert if dialect == "sqlite" else postgresql_insert
    stmt = (
        insert(Job)
        .values(**values)
        .on_conflict_do_nothing(index_elements=_KEY_COLUMNS)
        .returning(Job.id)
    )
    return session.execute(stmt).first() is not None


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
    values = {
        "series_id": series.id,
        "source_series_uid": key.source_series_uid,
        "instances_hash": key.instances_hash,
        "model_id": model_id,
        "model_version": model_version,
        "factor": key.factor,
        "rule_name": rule_name,
        "destinations": list(destinations),
        "priority": priority,
        "state": JobState.queued,
        "supersedes_job_id": previous.id if previous is not None else None,
        "stage_seconds": {},
        "source_sop_uids": sop_uids,
        "derived_files": [],
        "summary": dict(summary or {}),
    }
    inserted = _insert_unless_queued(session, values)
    # Ours, or the one someone queued between our lookup and insert (theirs wins).
    job = _find(session, key)
    if job is None:  # pragma: no cover - inserted, or the key existed
        raise IntegrityError("queue_job", None, Exception("job key conflict"))
    if not inserted:
        return job, False
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
    # The reason describes the current state only; the history is in the audit trail (a job
    # that was finally sent must not still show the reason of its last failed attempt).
    job.reason = reason
    if new is not JobState.running:
        # Nobody holds a job that no stage is working on; claimed_by stays to show who last did.
        job.lease_expires_at = None
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


def _lease_until(lease_s: float, now: datetime | None = None) -> datetime:
    return (now or utcnow()) + timedelta(seconds=lease_s)


def _running_values(node_id: str, lease_s: float) -> dict[str, object]:
    now = utcnow()
    return {
        "state": JobState.running,
        "attempts": Job.attempts + 1,
        "claimed_by": node_id,
        "lease_expires_at": _lease_until(lease_s, now),
        "reason": None,
        "updated_at": now,
    }


def _audit_claims(session: Session, job_ids: list[int], node_id: str) -> None:
    for job_id in job_ids:
        audit(session, "job_claimed", job_id=job_id, detail={"node": node_id})


def claim(session: Session, job_id: int, node_id: str, lease_s: float) -> bool:
    """Atomically move a queued job to running for ``node_id`` (attempts + 1), leased for
    ``lease_s``. False if someone else took it first. The caller commits."""
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.queued)
        .values(**_running_values(node_id, lease_s))
    )
    if res.rowcount == 1:
        _audit_claims(session, [job_id], node_id)
    return res.rowcount == 1


def claim_next(session: Session, node_id: str, lease_s: float, limit: int) -> list[int]:
    """Claim up to ``limit`` queued jobs in dispatch order for ``node_id``; returns their ids.
    The caller commits.

    PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` hands concurrent claimers different
    rows without waiting on each other. SQLite (one writer at a time): the conditional UPDATE
    of :func:`claim`, job by job.
    """
    if limit <= 0:
        return []
    if session.get_bind().dialect.name != "postgresql":
        return [j.id for j in next_queued(session, limit) if claim(session, j.id, node_id, lease_s)]
    ids = list(
        session.scalars(
            select(Job.id)
            .where(Job.state == JobState.queued)
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    if ids:
        session.execute(
            update(Job).where(Job.id.in_(ids)).values(**_running_values(node_id, lease_s))
        )
        _audit_claims(session, ids, node_id)
    return ids


def claim_send(session: Session, job_id: int, node_id: str, lease_s: float) -> bool:
    """Claim a ``written`` job's next send attempt for ``node_id``, unless another node holds
    an unexpired lease on it (then False: two nodes never send the same job at once). The
    caller commits; :func:`release` ends the claim after the attempt."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.state == JobState.written,
            Job.lease_expires_at.is_(None) | (Job.lease_expires_at < now),
        )
        .values(claimed_by=node_id, lease_expires_at=_lease_until(lease_s, now))
    )
    return res.rowcount == 1


def release(session: Session, job_id: int, node_id: str) -> None:
    """End ``node_id``'s claim on a job (after a send attempt). The caller commits."""
    session.execute(
        update(Job).where(Job.id == job_id, Job.claimed_by == node_id).values(lease_expires_at=None)
    )


def renew(session: Session, node_id: str, job_ids: Iterable[int], lease_s: float) -> set[int]:
    """Extend ``node_id``'s leases on ``job_ids`` (the heartbeat); returns the ids it still
    holds. A job missing from the answer was taken over, or finished. The caller commits."""
    job_ids = list(job_ids)
    if not job_ids:
        return set()
    res = session.execute(
        update(Job)
        .where(
            Job.id.in_(job_ids),
            Job.claimed_by == node_id,
            Job.lease_expires_at.is_not(None),
            Job.state.in_([JobState.running, JobState.written]),
        )
        .values(lease_expires_at=_lease_until(lease_s))
        .returning(Job.id)
    )
    return set(res.scalars())


def holds(job: Job, node_id: str) -> bool:
    """Whether ``node_id`` holds ``job``: claimed by it, or by nobody (claimed before claims
    had owners)."""
    return job.claimed_by is None or job.claimed_by == node_id


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


def _requeue_running(
    session: Session, condition: ColumnElement[bool], reason: str, now: datetime
) -> list[int]:
    """Queue every ``running`` job matching ``condition`` again, each by a conditional UPDATE
    (its holder's heartbeat or another node's reaper may get there first), audited like a
    transition."""
    rows = session.execute(
        select(Job.id, Job.source_series_uid, Job.claimed_by)
        .where(Job.state == JobState.running, condition)
        .order_by(Job.id)
    ).all()
    done = []
    for job_id, series_uid, holder in rows:
        res = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.running, condition)
            .values(
                state=JobState.queued,
                reason=reason,
                claimed_by=None,
                lease_expires_at=None,
                updated_at=now,
            )
        )
        if res.rowcount == 1:
            done.append(job_id)
            audit(
                session,
                "job_queued",
                series_uid=series_uid,
                job_id=job_id,
                detail={"from": JobState.running.value, "reason": reason, "node": holder},
            )
    return done


def reap_expired(session: Session, now: datetime | None = None) -> list[int]:
    """Queue again every ``running`` job whose lease has expired: the node running it died,
    hangs, or lost the database for longer than the lease. Jobs whose holder still renews
    are left alone. Returns the requeued ids; the caller commits."""
    now = now or utcnow()
    expired = Job.lease_expires_at.is_(None) | (Job.lease_expires_at < now)
    return _requeue_running(
        session, expired, "requeued: its lease expired (the node running it stopped)", now
    )


def reclaim_own(session: Session, node_id: str) -> list[int]:
    """At start-up: jobs that this node (the same ``node.id``) was running when it stopped go
    back to the queue at once, without waiting for their leases; so do ``running`` jobs
    without an owner (claimed before claims had owners). Its send claims end. Jobs that other
    nodes hold are left alone. Returns the requeued ids; the caller commits."""
    mine = (Job.claimed_by == node_id) | Job.claimed_by.is_(None)
    requeued = _requeue_running(
        session, mine, "requeued at start-up: interrupted while running", utcnow()
    )
    release_sends = (
        update(Job)
        .where(Job.state == JobState.written, Job.claimed_by == node_id)
        .values(lease_expires_at=None)
    )
    session.execute(release_sends)
    return requeued


def requeue(session: Session, job: Job, reason: str, *, forget_sent: bool = False) -> Job:
    """Queue an existing job again (reprocess). ``forget_sent`` drops its acknowledgement records
    so that every derived instance is sent again (same UIDs, so PACS replaces, never duplicates)."""
    if forget_sent:
        session.execute(delete(SentInstance).where(SentInstance.job_id == job.id))
    return transition(
        session,
        job,
        JobState.queued,
        reason,
        next_send_at=None,
        send_attempts=0,
        send_failing_since=None,
    )


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


def record_ack(session: Session, job: Job, destination: str, sop_uid: str, status: int) -> None:
    """Remember that ``destination`` acknowledged ``sop_uid`` (idempotent). The caller commits."""
    record_acks(session, job.id, destination, [(sop_uid, status)])


def record_acks(
    session: Session, job_id: int, destination: str, acks: Iterable[tuple[str, int]]
) -> int:
    """Remember a batch of (SOP Instance UID, status) acknowledgements by ``destination``;
    ones already recorded are skipped (idempotent). Returns how many were new. The caller
    commits."""
    acks = dict(acks)
    if not acks:
        return 0
    known = set(
        session.scalars(
            select(SentInstance.sop_instance_uid).where(
                SentInstance.job_id == job_id,
                SentInstance.destination == destination,
                SentInstance.sop_instance_uid.in_(list(acks)),
            )
        )
    )
    new = [
        SentInstance(job_id=job_id, destination=destination, sop_instance_uid=u, status=st)
        for u, st in acks.items()
        if u not in known
    ]
    session.add_all(new)
    return len(new)


class NotPossible(ValueError):
    """An operator's request that the job's state does not allow (the message says why)."""


def missing_derived(job: Job, spool_root: Path) -> str | None:
    """Why the job's derived series cannot be sent (None when every file is there)."""
    try:
        files = derived_paths(job, spool_root)
    except StoredPathError as exc:
        return f"job {job.id}'s derived series cannot be read: {exc}"
    if not files:
        return f"job {job.id} has no derived series; reprocess the series"
    missing = [f for f in files if not f.exists()]
    if missing:
        return (
            f"{len(missing)} of job {job.id}'s {len(files)} derived files are gone "
            "(retention?); reprocess the series"
        )
    return None


def resend(session: Session, job: Job, spool_root: Path, *, all_instances: bool = False) -> Job:
    """Send a job's derived series again: only what each destination has not acknowledged, or
    everything with ``all_instances`` (same UIDs: a PACS replaces, never duplicates). Raises
    :class:`NotPossible` when there is nothing to send. The caller commits."""
    if job.state not in (JobState.written, JobState.sent, JobState.failed):
        raise NotPossible(f"job {job.id} is {job.state.value}: nothing to resend yet")
    why = missing_derived(job, spool_root)
    if why:
        raise NotPossible(why)
    if all_instances:
        session.execute(delete(SentInstance).where(SentInstance.job_id == job.id))
    return transition(
        session,
        job,
        JobState.written,
        None,
        next_send_at=None,
        send_attempts=0,
        send_failing_since=None,
    )


def derived_dir_path(job: Job, spool_root: Path) -> Path | None:
    """The folder of the job's derived series on this node (None until the worker wrote it).
    Raises :class:`~dicom_node.spool.StoredPathError` for a value that leaves the spool."""
    return from_stored(job.derived_dir, spool_root) if job.derived_dir else None


def derived_paths(job: Job, spool_root: Path) -> list[Path]:
    """The job's derived files on this node (empty until the worker wrote them). Raises
    :class:`~dicom_node.spool.StoredPathError` for a folder that leaves the spool or a file
    name that is not a plain name in it."""
    folder = derived_dir_path(job, spool_root)
    if folder is None:
        return []
    names = list(job.derived_files or [])
    for name in names:
        if not name or Path(name).name != name or name in (".", ".."):
            raise StoredPathError(f"derived file name {name!r:.200} is not a plain name")
    return [folder / name for name in names]


def preview_file(job: Job, spool_root: Path) -> Path | None:
    """The job's preview PNG on this node (None when it has none). Raises
    :class:`~dicom_node.spool.StoredPathError` for a value that leaves the spool."""
    return from_stored(job.preview_path, spool_root) if job.preview_path else None


def schedule_send_retry(
    session: Session, job: Job, delay_s: float, reason: str, now: datetime | None = None
) -> None:
    """Record a transient send failure; the send loop tries again after ``delay_s``."""
    now = now or utcnow()
    job.next_send_at = now + timedelta(seconds=delay_s)
    job.send_failing_since = job.send_failing_since or now
    job.reason = f"retrying: {reason}"
    audit(
        session,
        "send_retry_scheduled",
        series_uid=job.source_series_uid,
        job_id=job.id,
        detail={"delay_s": round(delay_s, 2), "reason": reason, "attempt": job.send_attempts},
    )
