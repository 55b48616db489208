"""Delivery: one send attempt of a written job to all its destinations, and what comes next.

:func:`deliver_job` is one attempt: for each destination it sends (send.py) only the derived
instances that destination has not acknowledged, recording acknowledgements *as they arrive*
(:class:`AckRecorder`, committed every ``send.ack_batch`` instances or ``send.ack_flush_s``
seconds), so that a crash mid-send leaves at most one batch unrecorded. When the previous
attempt was cut off (a crash leaves ``job.send_started_at`` set) or failed mid-series, the
destination is first asked by C-FIND which instances it already holds, and those count as
acknowledged: a PACS that answers C-FIND gets nothing twice. Then :func:`decide`, a pure
function, says what follows:

* every destination acknowledged everything -> ``sent``;
* a permanent failure (a refusal status, a rejected association, an unknown destination) ->
  ``failed`` at once (a dead letter with its reason);
* a transient failure (refused connection, timeout, abort) -> retry after a backoff delay, until
  the failures have lasted ``send.retry_window_s`` (8 h by default: PACS maintenance windows),
  or ``send.max_attempts`` if one is set -> then ``failed``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dicom_node import jobs as jobs_mod
from dicom_node import stow
from dicom_node.config import DicomWebDestination, NodeConfig, SendSection
from dicom_node.db import Job, JobState, Series, SeriesState, audit, utcnow
from dicom_node.send import (
    FailureKind,
    destination_from_config,
    find_stored_instances,
    next_retry_delay,
    send_instances,
)
from dicom_node.spool import StoredPathError
from dicom_node.stow import StowTarget
from dicom_node.web import metrics

__all__ = ["AckRecorder", "AttemptResult", "NextStep", "RetryPolicy", "decide", "deliver_job"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often transient send failures are retried."""

    base_delay_s: float = 2.0
    max_delay_s: float = 300.0
    retry_window_s: float = 8 * 3600.0
    max_attempts: int | None = None

    @classmethod
    def from_config(cls, send: SendSection) -> RetryPolicy:
        return cls(send.base_delay_s, send.max_delay_s, send.retry_window_s, send.max_attempts)


@dataclass
class AttemptResult:
    """What one attempt to all destinations came to."""

    failure_kind: FailureKind | None = None  # the worst over all destinations
    reasons: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    retry_after_s: float | None = None  # the least delay a peer asked for (Retry-After)

    def add_failure(self, kind: FailureKind, reason: str, retry_after_s: float | None = None):
        if self.failure_kind is not FailureKind.PERMANENT:
            self.failure_kind = kind
        self.reasons.append(reason)
        if retry_after_s is not None:
            self.retry_after_s = max(self.retry_after_s or 0.0, retry_after_s)


@dataclass(frozen=True)
class NextStep:
    """The job's next state; ``retry_in_s`` is set when it stays ``written`` for a retry."""

    state: JobState
    reason: str | None = None
    retry_in_s: float | None = None


def decide(
    attempt: AttemptResult,
    *,
    attempts_so_far: int,
    failing_since: datetime | None,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random | None = None,
) -> NextStep:
    """Retry when, or give up: a pure function of the attempt, the failure history and the
    policy. ``attempts_so_far`` counts this attempt; ``failing_since`` is when the current run
    of transient failures began (None if the previous attempt succeeded or this is the first)."""
    reason = "; ".join(attempt.reasons)
    if attempt.failure_kind is None:
        return NextStep(JobState.sent)
    if attempt.failure_kind is FailureKind.PERMANENT:
        return NextStep(JobState.failed, f"send failed permanently: {reason}")
    since = failing_since or now
    failing_s = (now - since).total_seconds()
    if failing_s >= policy.retry_window_s:
        return NextStep(
            JobState.failed,
            f"send gave up after {_duration(failing_s)} of failures "
            f"({attempts_so_far} attempts): {reason}",
        )
    if policy.max_attempts is not None and attempts_so_far >= policy.max_attempts:
        return NextStep(JobState.failed, f"send gave up after {attempts_so_far} attempts: {reason}")
    delay = next_retry_delay(attempts_so_far - 1, policy.base_delay_s, policy.max_delay_s, rng)
    delay = max(delay, attempt.retry_after_s or 0.0)  # a server that said when to come back
    # Never plan a retry past the end of the window: the last one happens at its end.
    delay = max(0.0, min(delay, policy.retry_window_s - failing_s))
    return NextStep(JobState.written, reason, retry_in_s=delay)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


class AckRecorder:
    """Buffers acknowledgements of one job and destination and commits them in batches.

    ``add`` is called from the send loop after each C-STORE response; a batch is committed when
    it holds ``batch`` UIDs or ``flush_s`` seconds passed since the last commit. A commit that
    fails (database locked, disk full) keeps the batch for the next try: at worst those
    instances are sent again, which PACS treats as the same instance (same UIDs).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        job_id: int,
        destination: str,
        *,
        batch: int = 32,
        flush_s: float = 1.0,
    ):
        self.sessions, self.job_id, self.destination = sessions, job_id, destination
        self.batch, self.flush_s = batch, flush_s
        self._pending: dict[str, int] = {}
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self.committed = 0

    def add(self, sop_instance_uid: str, status: int) -> None:
        with self._lock:
            self._pending[sop_instance_uid] = status
            due = len(self._pending) >= self.batch or time.monotonic() - self._last >= self.flush_s
        if due:
            self.flush()

    def drain(self) -> list[tuple[str, int]]:
        """Take the acknowledgements not committed yet (the caller commits them)."""
        with self._lock:
            pending, self._pending = list(self._pending.items()), {}
        return pending

    def flush(self) -> bool:
        """Commit what is buffered; False (and the buffer kept) if the database refused."""
        with self._lock:
            pending = dict(self._pending)
            self._last = time.monotonic()
        if not pending:
            return True
        try:
            with self.sessions() as s:
                jobs_mod.record_acks(s, self.job_id, self.destination, pending.items())
                s.commit()
        except Exception as exc:
            log.warning(
                "cannot record %d acknowledgements yet job_id=%s destination=%s: %s",
                len(pending),
                self.job_id,
                self.destination,
                exc,
            )
            return False
        with self._lock:
            for uid in pending:
                self._pending.pop(uid, None)
            self.committed += len(pending)
        return True


def deliver_job(
    config: NodeConfig,
    sessions: sessionmaker[Session],
    job_id: int,
    *,
    policy: RetryPolicy | None = None,
    rng: random.Random | None = None,
) -> JobState:
    """One send attempt of a written job to all its destinations; returns the new state."""
    policy = policy or RetryPolicy.from_config(config.send)
    with sessions() as s:
        job = s.get(Job, job_id)
        if job is None or job.state is not JobState.written:
            return job.state if job else JobState.failed
        try:
            files = jobs_mod.derived_paths(job, config.storage.spool_root)
        except StoredPathError as exc:
            jobs_mod.transition(s, job, JobState.failed, f"derived files not read: {exc}")
            s.commit()
            return JobState.failed
        missing = [f for f in files if not f.exists()]
        if not files or missing:
            jobs_mod.transition(
                s, job, JobState.failed, f"derived files missing ({len(missing)}); reprocess"
            )
            s.commit()
            return JobState.failed
        destinations = list(job.destinations or [])
        series_uid = job.source_series_uid
        # The last attempt was cut off (still marked as running) or ended on a transient failure
        # mid-series: acknowledgements may be missing for instances the PACS holds.
        verify = job.send_started_at is not None or job.send_failing_since is not None
        derived = (s.get(Series, job.series_id).study.study_uid, job.derived_series_uid or "")
        job.send_started_at = utcnow()
        s.commit()
    # No transaction stays open while the network is busy: acknowledgements commit on their own.
    attempt = AttemptResult()
    for name in destinations:
        if verify:
            _acknowledge_what_is_stored(config, sessions, job_id, name, derived)
        _send_to(config, sessions, job_id, series_uid, name, files, attempt)
    return _record_outcome(sessions, job_id, attempt, policy, rng)


def _acknowledge_what_is_stored(
    config: NodeConfig,
    sessions: sessionmaker[Session],
    job_id: int,
    name: str,
    derived: tuple[str, str],
) -> None:
    """Ask the destination (C-FIND, or QIDO-RS for DICOMweb) which instances of the derived
    series it already holds and record them as acknowledged, so that a resend after a crash
    sends nothing twice. A destination that cannot answer gets the unacknowledged instances
    again (a PACS stores a re-sent instance under the same UIDs: a repeat, never a second
    series)."""
    study_uid, series_uid = derived
    try:
        dcfg = config.destination(name)
    except KeyError:
        return
    if isinstance(dcfg, DicomWebDestination):
        target = StowTarget(dcfg)
        found = stow.find_stored(target, study_uid, series_uid)
        peer = str(target)
    else:
        dest = destination_from_config(dcfg)
        found = find_stored_instances(
            dest,
            calling_ae_title=config.node.ae_title,
            study_uid=study_uid,
            series_uid=series_uid,
            timeout=config.node.dimse_timeout_s,
        )
        peer = str(dest)
    with sessions() as s:
        new = jobs_mod.record_acks(s, job_id, name, [(uid, 0) for uid in found or ()])
        audit(
            s,
            "send_verified",
            job_id=job_id,
            peer=peer[:64],
            detail={
                "destination": name,
                "held_by_destination": None if found is None else len(found),
                "newly_acknowledged": new,
            },
        )
        s.commit()
    log.info(
        "asked %s what it holds job_id=%s held=%s newly_acknowledged=%d",
        name,
        job_id,
        "unknown" if found is None else len(found),
        new,
    )


def _send_to(
    config: NodeConfig,
    sessions: sessionmaker[Session],
    job_id: int,
    series_uid: str,
    name: str,
    files: Sequence[Path],
    attempt: AttemptResult,
) -> None:
    node = config.node
    try:
        dcfg = config.destination(name)
    except KeyError:
        attempt.add_failure(FailureKind.PERMANENT, f"{name}: destination is no longer configured")
        return
    with sessions() as s:
        acked = jobs_mod.acknowledged(s, s.get(Job, job_id), name)
    recorder = AckRecorder(
        sessions, job_id, name, batch=config.send.ack_batch, flush_s=config.send.ack_flush_s
    )
    if isinstance(dcfg, DicomWebDestination):
        dest: object = StowTarget(dcfg)
        res = stow.stow_instances(dest, files, already_acknowledged=acked, on_ack=recorder.add)
    else:
        dest = destination_from_config(dcfg)
        res = send_instances(
            dest,
            files,
            calling_ae_title=node.ae_title,
            already_acknowledged=acked,
            acse_timeout=node.acse_timeout_s,
            dimse_timeout=node.dimse_timeout_s,
            network_timeout=node.network_timeout_s,
            on_ack=recorder.add,
        )
    attempt.elapsed_s += res.elapsed_s
    acked_now = [o for o in res.outcomes if o.sent_now and o.acknowledged]
    refused = sum(1 for o in res.outcomes if o.sent_now and not o.acknowledged)
    metrics.sent(name, acknowledged=len(acked_now), failed=refused)
    with sessions() as s:
        # What the recorder has not committed yet goes in with the attempt's audit event.
        jobs_mod.record_acks(s, job_id, name, recorder.drain())
        audit(
            s,
            "send_attempt",
            series_uid=series_uid,
            job_id=job_id,
            peer=str(dest)[:64],
            detail={
                "destination": name,
                "sent_now": len(res.sent_now),
                "acknowledged": len(res.acknowledged),
                "of": len(files),
                "failure": res.failure.reason if res.failure else None,
                "seconds": round(res.elapsed_s, 3),
            },
        )
        s.commit()
    if not res.ok:
        kind = res.failure.kind if res.failure else FailureKind.TRANSIENT
        attempt.add_failure(
            kind,
            f"{name}: {res.failure.reason if res.failure else 'not all acknowledged'}",
            res.failure.retry_after_s if res.failure else None,
        )


def _record_outcome(
    sessions: sessionmaker[Session],
    job_id: int,
    attempt: AttemptResult,
    policy: RetryPolicy,
    rng: random.Random | None,
) -> JobState:
    now = utcnow()
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        stages = dict(job.stage_seconds or {})
        stages["send"] = round(stages.get("send", 0.0) + attempt.elapsed_s, 3)
        job.stage_seconds = stages
        job.send_attempts = (job.send_attempts or 0) + 1
        job.send_started_at = None
        series_uid = job.source_series_uid
        step = decide(
            attempt,
            attempts_so_far=job.send_attempts,
            failing_since=job.send_failing_since,
            now=now,
            policy=policy,
            rng=rng,
        )
        if step.state is JobState.sent:
            note = None if job.destinations else "no destinations: kept locally"
            jobs_mod.transition(
                s, job, JobState.sent, note, next_send_at=None, send_failing_since=None
            )
            ser = s.get(Series, job.series_id)
            if ser is not None and ser.state is SeriesState.complete:
                ser.state = SeriesState.processed
        elif step.state is JobState.failed:
            jobs_mod.transition(s, job, JobState.failed, step.reason)
        else:
            assert step.retry_in_s is not None and step.reason is not None
            jobs_mod.schedule_send_retry(s, job, step.retry_in_s, step.reason, now=now)
        s.commit()
    metrics.job_stages({"send": attempt.elapsed_s}, job_id=job_id, series_uid=series_uid)
    if step.retry_in_s is not None:
        metrics.send_retry()
    log.info("send job_id=%s state=%s reason=%s", job_id, step.state.value, step.reason)
    return step.state
