"""What an operator can do to a series or a job, shared by the CLI and the HTTP API.

``dicom-node reprocess`` and ``POST /api/series/{uid}/reprocess`` both call :func:`reprocess`;
``dicom-node resend`` and ``POST /api/jobs/{id}/resend`` both call :func:`resend`. Each records
in the audit trail who asked (``by``), through what (``via``: ``cli`` or ``http``) and from where
(``peer``), and commits. :func:`job_as_dict` is the one description of a job that ``jobs
show --json``, ``jobs list --json`` and the API give; :func:`series_as_dict` is the one of a
series that ``series list/show --json``, the API and the console give; :func:`json_default`
writes their times the same way in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node import jobs
from dicom_node.config import NodeConfig
from dicom_node.db import Job, JobState, Series, SeriesState, audit
from dicom_node.infer import ModelPool
from dicom_node.jobs import NotPossible
from dicom_node.scheduler import plan_and_queue
from dicom_node.spool import StoredPathError, from_stored

__all__ = [
    "ActionResult",
    "NotFound",
    "NotPossible",
    "job_as_dict",
    "json_default",
    "reprocess",
    "resend",
    "series_as_dict",
]

ReprocessAction = Literal["queued", "already_active", "requeued", "already_done"]


class NotFound(LookupError):
    """No series or job with that identifier."""


@dataclass(frozen=True)
class ActionResult:
    """What an operator action did: ``action`` says which case, ``job`` is the job it concerns
    (detached: read its columns freely), ``message`` one line for a person."""

    action: str
    job_id: int
    job_state: JobState
    message: str
    supersedes_job_id: int | None = None
    derived_series_uid: str | None = None


def reprocess(
    session: Session,
    config: NodeConfig,
    series_uid: str,
    models: ModelPool,
    *,
    force: bool = False,
    by: str,
    via: str,
    peer: str | None = None,
) -> ActionResult:
    """Process a series again from its retained source files, and commit.

    The same instances with the same model and factor give the same job and the same UIDs, so a
    PACS never gets a second copy. A job already ``sent`` (or ``written``) for this exact input
    is left alone unless ``force`` (action ``already_done``, nothing changes); a failed or
    rejected one is queued again. Raises :class:`NotFound`, or :class:`NotPossible` when the
    series is rejected or no rule wants it (the reason says which).
    """
    series = session.scalars(select(Series).where(Series.series_uid == series_uid)).first()
    if series is None:
        raise NotFound(f"no series {series_uid}")
    outcome = plan_and_queue(session, config, series, models)
    if outcome.job is None:
        if outcome.state is SeriesState.rejected:
            series.state, series.state_reason = outcome.state, outcome.reason
            session.commit()
            raise NotPossible(f"series rejected: {outcome.reason}")
        raise NotPossible(outcome.reason or "series not processed")
    job = outcome.job
    action: ReprocessAction
    if outcome.created:
        action, message = "queued", f"queued job {job.id}"
        if job.supersedes_job_id:
            message += f" (supersedes job {job.supersedes_job_id})"
    elif job.state in (JobState.queued, JobState.running):
        action, message = "already_active", f"job {job.id} is already {job.state.value}"
    elif job.state in (JobState.failed, JobState.rejected) or force:
        jobs.requeue(session, job, "reprocess requested", forget_sent=True)
        action, message = "requeued", f"requeued job {job.id} (same input: same derived UIDs)"
    else:
        session.rollback()
        return ActionResult(
            "already_done",
            job.id,
            job.state,
            f"job {job.id} already processed this input ({job.state.value}); derived series "
            f"{job.derived_series_uid}",
            job.supersedes_job_id,
            job.derived_series_uid,
        )
    series.state, series.state_reason = SeriesState.complete, None
    audit(
        session,
        "reprocess",
        series_uid=series_uid,
        job_id=job.id,
        peer=peer,
        detail={"force": force, "by": by, "via": via},
    )
    session.commit()
    return ActionResult(
        action, job.id, job.state, message, job.supersedes_job_id, job.derived_series_uid
    )


def resend(
    session: Session,
    config: NodeConfig,
    job_id: int,
    *,
    all_instances: bool = False,
    by: str,
    via: str,
    peer: str | None = None,
) -> ActionResult:
    """Send a job's derived series again (only what each destination has not acknowledged,
    or everything with ``all_instances``), and commit. Raises :class:`NotFound`, or
    :class:`NotPossible` when the job has nothing to send."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    jobs.resend(session, job, config.storage.spool_root, all_instances=all_instances)
    audit(
        session,
        "resend",
        series_uid=job.source_series_uid,
        job_id=job.id,
        peer=peer,
        detail={"all": all_instances, "by": by, "via": via},
    )
    session.commit()
    return ActionResult("resend", job.id, job.state, f"job {job.id} will be sent again")


def _on_this_node(stored: str | None, spool_root: Path) -> str | None:
    try:
        return str(from_stored(stored, spool_root)) if stored else None
    except StoredPathError:
        return None  # a value that leaves the spool is not shown as a place to look


def job_as_dict(
    job: Job,
    spool_root: Path,
    acked: dict[str, int] | None = None,
    superseded_uid: str | None = None,
) -> dict:
    """The job's columns and display figures, JSON-ready (times are UTC, without an offset).
    ``derived_dir`` and ``preview_path`` are given as paths on this node (under ``spool_root``);
    the database keeps them relative to the spool."""
    summary = job.summary or {}
    d = {
        "id": job.id,
        "state": job.state.value,
        "reason": job.reason,
        "source_series_uid": job.source_series_uid,
        "instances_hash": job.instances_hash,
        "model_id": job.model_id,
        "model_version": job.model_version,
        "factor": job.factor,
        "rule": job.rule_name,
        "priority": job.priority,
        "destinations": job.destinations or [],
        "attempts": job.attempts,
        "send_attempts": job.send_attempts,
        "next_send_at": job.next_send_at.isoformat() if job.next_send_at else None,
        "derived_series_uid": job.derived_series_uid,
        "derived_dir": _on_this_node(job.derived_dir, spool_root),
        "preview_path": _on_this_node(job.preview_path, spool_root),
        "supersedes_job_id": job.supersedes_job_id,
        "stage_seconds": job.stage_seconds or {},
        "n_in": summary.get("n_in", len(job.source_sop_uids or [])),
        "n_out": summary.get("n_out"),
        "spacing_in_mm": summary.get("spacing_in_mm"),
        "spacing_out_mm": summary.get("spacing_out_mm"),
        "model_note": summary.get("model_note"),
        "replaces_delivered_job": summary.get("replaces_delivered_job"),
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "updated_at": job.updated_at.isoformat() if job.updated_at else None,
    }
    if acked is not None:
        d["acknowledged"] = acked
    if superseded_uid is not None or job.supersedes_job_id is not None:
        d["supersedes_derived_series_uid"] = superseded_uid
    return d


def series_as_dict(series: Series, study_uid: str, n_instances: int) -> dict:
    """The series' columns (no patient data), with ``datetime`` objects for times (naive UTC,
    as the database keeps them): the console formats them, the JSON writers encode them."""
    return {
        "series_uid": series.series_uid,
        "study_uid": study_uid,
        "modality": series.modality,
        "series_number": series.series_number,
        "series_description": series.series_description,
        "body_part": series.body_part,
        "n_instances": n_instances,
        "state": series.state.value,
        "state_reason": series.state_reason,
        "revision": series.revision,
        "calling_ae": series.calling_ae,
        "first_received": series.first_received,
        "last_received": series.last_received,
        "hold_until": series.hold_until,
    }


def json_default(value: Any) -> Any:
    """``json.dumps(..., default=json_default)``: times as ISO 8601 to the second (UTC, as
    stored, without an offset), for ``--json`` output and the API alike."""
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    raise TypeError(f"not JSON: {type(value).__name__}")
