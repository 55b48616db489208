"""Read-only views of the index for the JSON API, the console and the metrics collector.

Every function takes an open session and returns plain data (dicts of JSON-ready values, with
``datetime`` objects for times: naive UTC, as the database keeps them). Each query is bounded
(a page, a ``LIMIT``, an indexed count), so that a page costs the same with ten series or ten
thousand: the overview and ``/metrics`` are measured with 10,000 of each by
``benchmarks/console_http.py``.

Nothing here returns patient data, except :func:`patient_of`, which the caller uses only for an
authenticated person.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.config import Destination, NodeConfig
from dicom_node.db import AuditEvent, Instance, Job, JobState, SentInstance, Series, Study
from dicom_node.operations import job_as_dict, series_as_dict

__all__ = [
    "audit_rows",
    "count_by_state",
    "LastSuccess",
    "destination_status",
    "job_detail",
    "job_rows",
    "overview",
    "patient_of",
    "series_detail",
    "series_rows",
]

log = logging.getLogger(__name__)

RECENT_SEND_EVENTS = 500  # send attempts looked at for each destination's last failure
ACTIVE = (JobState.queued, JobState.running, JobState.written)


def count_by_state(session: Session, table: str) -> dict[str, int]:
    """``{state: count}`` of series or jobs (indexed: a few milliseconds for 10,000 rows)."""
    model = {"series": Series, "jobs": Job}[table]
    rows = session.execute(select(model.state, func.count()).group_by(model.state)).all()
    return {state.value: n for state, n in rows}


class LastSuccess:
    """When each destination last acknowledged an instance, read incrementally.

    The answer is the newest acknowledgement row of the destination. The first call walks the
    table back from its newest row for each destination (a destination that never succeeded
    costs one pass over every row: about 90 ms for 720,000 rows); later calls read only the
    rows added since (ids grow with time). A last success, once seen, stays true even if
    retention later removes its row. One per process; thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen_id = 0
        self._last: dict[str, datetime] = {}

    def get(self, session: Session, config: NodeConfig) -> dict[str, datetime | None]:
        with self._lock:
            top = session.scalar(select(func.max(SentInstance.id))) or 0
            if self._seen_id == 0 and top > 0:
                # First call: each destination's newest row, found walking back from the end.
                for dest in config.destinations:
                    at = session.scalars(
                        select(SentInstance.sent_at)
                        .where(SentInstance.destination == dest.name, SentInstance.id <= top)
                        .order_by(SentInstance.id.desc())
                        .limit(1)
                    ).first()
                    if at is not None:
                        self._last[dest.name] = at
                self._seen_id = top
            if top > self._seen_id:
                rows = session.execute(
                    select(SentInstance.destination, func.max(SentInstance.sent_at))
                    .where(SentInstance.id > self._seen_id, SentInstance.id <= top)
                    .group_by(SentInstance.destination)
                ).all()
                for name, at in rows:
                    if at is not None and (name not in self._last or at > self._last[name]):
                        self._last[name] = at
                self._seen_id = top
            return {d.name: self._last.get(d.name) for d in config.destinations}


def _send_attempts(session: Session, limit: int, job_id: int | None = None) -> list[dict]:
    """The newest ``send_attempt`` audit events, parsed (newest first)."""
    q = select(AuditEvent).where(AuditEvent.kind == "send_attempt")
    if job_id is not None:
        q = q.where(AuditEvent.job_id == job_id)
    out = []
    for ev in session.scalars(q.order_by(AuditEvent.id.desc()).limit(limit)):
        try:
            detail = json.loads(ev.detail or "{}")
        except ValueError:
            continue
        out.append({"at": ev.at, "job_id": ev.job_id, **detail})
    return out


def destination_status(session: Session, config: NodeConfig, last: LastSuccess) -> list[dict]:
    """Per configured destination: address, last success, last failure and its reason."""
    last_ok = last.get(session, config)
    attempts = _send_attempts(session, RECENT_SEND_EVENTS)
    out = []
    for dest in config.destinations:
        failure = next(
            (a for a in attempts if a.get("destination") == dest.name and a.get("failure")), None
        )
        dimse = isinstance(dest, Destination)
        out.append(
            {
                "name": dest.name,
                "type": dest.type,
                # DIMSE: AE title, host and port; DICOMweb: the base URL (never a credential).
                "address": (
                    f"{dest.ae_title}@{dest.host}:{dest.port}{' (TLS)' if dest.tls else ''}"
                    if dimse
                    else dest.url
                ),
                "ae_title": dest.ae_title if dimse else None,
                "host": dest.host if dimse else None,
                "port": dest.port if dimse else None,
                "tls": dest.tls is not None if dimse else dest.url.startswith("https:"),
                "last_success": last_ok.get(dest.name),
                "last_failure": failure["at"] if failure else None,
                "last_failure_reason": failure["failure"] if failure else None,
                "last_failure_job_id": failure["job_id"] if failure else None,
            }
        )
    return out


def series_rows(
    session: Session, *, state: str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[dict], int]:
    """One page of series, newest first, with instance counts and their latest job; and the
    total matching ``state``."""
    q = select(Series, Study.study_uid).join(Study, Study.id == Series.study_id)
    total_q = select(func.count(Series.id))
    if state is not None:
        q = q.where(Series.state == state)
        total_q = total_q.where(Series.state == state)
    page = session.execute(
        q.order_by(Series.last_received.desc(), Series.id.desc()).limit(limit).offset(offset)
    ).all()
    ids = [se.id for se, _ in page]
    counts = dict(
        session.execute(
            select(Instance.series_id, func.count())
            .where(Instance.series_id.in_(ids))
            .group_by(Instance.series_id)
        ).all()
    )
    latest = _latest_jobs(session, ids)
    rows = []
    for se, study_uid in page:
        d = series_as_dict(se, study_uid, counts.get(se.id, 0))
        job = latest.get(se.id)
        d["latest_job"] = {"id": job.id, "state": job.state.value} if job else None
        rows.append(d)
    return rows, int(session.scalar(total_q) or 0)


def _latest_jobs(session: Session, series_ids: list[int]) -> dict[int, Job]:
    if not series_ids:
        return {}
    newest = select(func.max(Job.id)).where(Job.series_id.in_(series_ids)).group_by(Job.series_id)
    return {j.series_id: j for j in session.scalars(select(Job).where(Job.id.in_(newest)))}


def series_detail(session: Session, uid: str, audit_limit: int = 50) -> dict | None:
    """One series: its fields, instance count and size, all its jobs and its audit events."""
    row = session.execute(
        select(Series, Study.study_uid)
        .join(Study, Study.id == Series.study_id)
        .where(Series.series_uid == uid)
    ).first()
    if row is None:
        return None
    series, study_uid = row
    n, size = session.execute(
        select(func.count(Instance.id), func.coalesce(func.sum(Instance.file_size), 0)).where(
            Instance.series_id == series.id
        )
    ).one()
    d = series_as_dict(series, study_uid, int(n))
    d["bytes"] = int(size)
    jobs = session.scalars(select(Job).where(Job.series_id == series.id).order_by(Job.id.desc()))
    d["jobs"] = [_job_row(j) for j in jobs]
    d["audit"] = audit_rows(session, limit=audit_limit, series_uid=uid)
    return d


def patient_of(session: Session, series_uid: str, spool_root: Path) -> dict | None:
    """Patient name and ID from the header of one of the series' stored files (the index
    keeps none); None when no file can be read. For authenticated requests only."""
    import pydicom

    paths = session.scalars(
        select(Instance.file_path)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.series_uid == series_uid)
        .order_by(Instance.id)
        .limit(3)
    ).all()
    for rel in paths:
        try:
            ds = pydicom.dcmread(
                spool_root / rel,
                stop_before_pixels=True,
                specific_tags=["PatientName", "PatientID"],
            )
        except Exception:  # a file removed by retention, or unreadable: try the next
            continue
        return {"name": str(ds.get("PatientName") or ""), "id": str(ds.get("PatientID") or "")}
    return None


def _job_row(job: Job) -> dict:
    summary = job.summary or {}
    return {
        "id": job.id,
        "state": job.state.value,
        "reason": job.reason,
        "source_series_uid": job.source_series_uid,
        "factor": job.factor,
        "rule": job.rule_name,
        "priority": job.priority,
        "destinations": job.destinations or [],
        "n_in": summary.get("n_in", len(job.source_sop_uids or [])),
        "n_out": summary.get("n_out"),
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }


def job_rows(
    session: Session,
    *,
    state: str | None = None,
    states: tuple[JobState, ...] | None = None,
    limit: int = 50,
    offset: int = 0,
    order: str = "newest",
) -> tuple[list[dict], int]:
    """One page of jobs (newest first, or in dispatch order with ``order="queue"``) and the
    total matching."""
    q = select(Job)
    total_q = select(func.count(Job.id))
    if state is not None:
        q, total_q = q.where(Job.state == state), total_q.where(Job.state == state)
    if states is not None:
        q, total_q = q.where(Job.state.in_(states)), total_q.where(Job.state.in_(states))
    if order == "queue":
        q = q.order_by(Job.priority.desc(), Job.created_at, Job.id)
    elif order == "updated":
        q = q.order_by(Job.updated_at.desc(), Job.id.desc())
    else:
        q = q.order_by(Job.id.desc())
    rows = [_job_row(j) for j in session.scalars(q.limit(limit).offset(offset))]
    return rows, int(session.scalar(total_q) or 0)


def job_detail(session: Session, job_id: int, spool_root: Path) -> dict | None:
    """Everything about one job, with the send status per destination."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    acked = dict(
        session.execute(
            select(SentInstance.destination, func.count())
            .where(SentInstance.job_id == job.id)
            .group_by(SentInstance.destination)
        ).all()
    )
    prev = session.get(Job, job.supersedes_job_id) if job.supersedes_job_id else None
    d = job_as_dict(job, spool_root, acked, prev.derived_series_uid if prev else None)
    later = session.scalars(select(Job.id).where(Job.supersedes_job_id == job.id)).first()
    d["superseded_by_job_id"] = later
    d["factor_reason"] = (job.summary or {}).get("factor_reason")
    d["notes"] = ((job.summary or {}).get("plan") or {}).get("notes", [])
    d["writer_notes"] = (job.summary or {}).get("writer_notes", [])
    n_files = len(job.derived_files or [])
    attempts = _send_attempts(session, 200, job_id=job.id)
    d["sends"] = []
    for name in job.destinations or []:
        last = next((a for a in attempts if a.get("destination") == name), None)
        d["sends"].append(
            {
                "destination": name,
                "acknowledged": acked.get(name, 0),
                "of": n_files,
                "last_attempt": last["at"] if last else None,
                "last_failure": last.get("failure") if last else None,
                "attempts": sum(1 for a in attempts if a.get("destination") == name),
            }
        )
    d["audit"] = audit_rows(session, limit=50, job_id=job.id)
    return d


def audit_rows(
    session: Session,
    *,
    limit: int = 50,
    before_id: int | None = None,
    series_uid: str | None = None,
    job_id: int | None = None,
    kind: str | None = None,
) -> list[dict]:
    """Audit events, newest first (``before_id`` pages back)."""
    q = select(AuditEvent)
    if before_id is not None:
        q = q.where(AuditEvent.id < before_id)
    if series_uid is not None:
        q = q.where(AuditEvent.series_uid == series_uid)
    if job_id is not None:
        q = q.where(AuditEvent.job_id == job_id)
    if kind is not None:
        q = q.where(AuditEvent.kind == kind)
    return [
        {
            "id": e.id,
            "at": e.at,
            "kind": e.kind,
            "series_uid": e.series_uid,
            "sop_instance_uid": e.sop_instance_uid,
            "job_id": e.job_id,
            "calling_ae": e.calling_ae,
            "peer": e.peer,
            "status": e.status,
            "detail": e.detail,
        }
        for e in session.scalars(q.order_by(AuditEvent.id.desc()).limit(limit))
    ]


def overview(
    session: Session, config: NodeConfig, last: LastSuccess, *, failed_limit: int = 10
) -> dict:
    """What the console's first page shows from the database."""
    failed, n_failed = job_rows(
        session, state=JobState.failed.value, limit=failed_limit, order="updated"
    )
    queue, n_queue = job_rows(session, states=ACTIVE, limit=10, order="queue")
    return {
        "series_by_state": count_by_state(session, "series"),
        "jobs_by_state": count_by_state(session, "jobs"),
        "failed_jobs": failed,
        "failed_total": n_failed,
        "queue": queue,
        "queue_total": n_queue,
        "destinations": destination_status(session, config, last),
        "audit": audit_rows(session, limit=12),
    }
