"""The processing pipeline: APScheduler drives completion, dispatch, sending and clean-up.

:class:`Pipeline` (started by :class:`dicom_node.node.Node` next to the receiver) runs four
periodic tasks on a ``BackgroundScheduler``; each keeps its state in the database, so the node can
stop at any moment and pick up where it left off:

* **completion** (every ``completion.check_interval_s``): quiet series -> plan (complete.py) ->
  rule (rules.py) -> job (jobs.py). Unusable series become ``rejected`` and series that no rule
  wants ``ignored``, both with a reason. A state change is committed only if no instance arrived
  while the series was being checked (``Series.revision`` unchanged); otherwise it waits for the
  next quiet period.
* **dispatch** (every second, and at once after a job is queued): claims queued jobs, highest
  priority first, while fewer than ``model.concurrency`` run, and hands them to worker threads
  (infer.py), which keep their models loaded between jobs.
* **send** (every second, and at once after a job is written): sends each written job to its
  destinations over one association each (send.py). Only instances a destination has not
  acknowledged go out. A transient failure schedules a retry after ``next_retry_delay``
  (exponential backoff with jitter) until ``send_max_attempts``; a permanent one fails the job at
  once (a dead letter, visible in ``jobs list --state failed``).
* **clean-up** (hourly): source and derived files older than ``storage.retention_days`` are
  removed once their jobs are finished (0 keeps everything).

At start-up, jobs left ``running`` by a crash go back to ``queued``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import jobs as jobs_mod
from dicom_node.complete import Rejection, due_series, plan_series, tolerances_from_config
from dicom_node.config import NodeConfig
from dicom_node.db import Instance, Job, JobState, Series, SeriesState, audit, utcnow
from dicom_node.infer import (
    ModelPool,
    ModelUnavailable,
    Worker,
    record_untrained,
    resolve_concurrency,
)
from dicom_node.rules import explain, factor_for, facts_from_series, select_rule

__all__ = ["Pipeline", "QueueOutcome", "evaluate_series", "plan_and_queue"]

log = logging.getLogger(__name__)


def _set_series_state(
    session: Session, series: Series, revision: int, state: SeriesState, reason: str | None
) -> bool:
    """Set the state only if no instance arrived since ``revision`` was read."""
    res = session.execute(
        update(Series)
        .where(Series.id == series.id, Series.revision == revision)
        .values(state=state, state_reason=reason)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


@dataclass
class QueueOutcome:
    """What planning a series led to: a job (new or existing), or a state with its reason."""

    state: SeriesState
    reason: str | None = None
    job: Job | None = None
    created: bool = False


def plan_and_queue(
    session: Session, config: NodeConfig, series: Series, models: ModelPool
) -> QueueOutcome:
    """Plan ``series`` (geometry), pick its rule and factor, and queue its job (idempotent: the
    same instance set, model and factor give the same job). Does not commit."""
    plan = plan_series(
        series,
        Path(config.storage.spool_dir).resolve(),
        tolerances_from_config(config.completion),
    )
    if isinstance(plan, Rejection):
        return QueueOutcome(SeriesState.rejected, plan.reason)
    missing = [r.label for r in plan.slices if not Path(r.file_path).exists()]
    if missing:
        return QueueOutcome(
            SeriesState.rejected,
            f"{len(missing)} source file(s) are no longer retained (first {missing[0]})",
        )
    facts = facts_from_series(series, plan)
    rule = select_rule(facts, config.rules)
    if rule is None:
        why = "; ".join(
            f"{e.rule.name}: " + ", ".join(r[4:] for r in e.reasons if r.startswith("no: "))
            for e in explain(facts, config.rules)
        )
        return QueueOutcome(SeriesState.ignored, f"no rule matched ({why or 'no rules'})")
    decision = factor_for(rule, plan.spacing_mm)
    if decision.factor is None:
        return QueueOutcome(SeriesState.ignored, decision.reason)
    ident = models.identity()
    job, created = jobs_mod.queue_job(
        session,
        series=series,
        sop_uids=plan.source_sop_uids,
        model_id=ident.model_id,
        model_version=ident.model_version,
        factor=decision.factor,
        rule_name=rule.name,
        destinations=rule.action.destinations,
        priority=rule.action.priority,
        summary={"rule": rule.name, "factor_reason": decision.reason},
    )
    if created:
        record_untrained(session, job, ident.note)
    done = not created and job.state is JobState.sent
    return QueueOutcome(SeriesState.processed if done else SeriesState.complete, None, job, created)


def evaluate_series(
    session: Session, config: NodeConfig, series: Series, models: ModelPool
) -> tuple[SeriesState, str | None, Job | None]:
    """Plan a quiet series, pick its rule and queue its job. Commits; returns what happened
    (state, reason, job). The state is not changed when the series moved on meanwhile."""
    revision = series.revision
    outcome = plan_and_queue(session, config, series, models)
    state, reason, job = outcome.state, outcome.reason, outcome.job
    if outcome.created:
        quiet = max(0.0, (utcnow() - series.last_received).total_seconds())
        job.stage_seconds = {"quiet": round(quiet, 3)}
    if not _set_series_state(session, series, revision, state, reason):
        session.rollback()
        log.info("series changed while checked; waiting series_uid=%s", series.series_uid)
        return SeriesState.changed, None, None
    audit(
        session,
        f"series_{state.value}",
        series_uid=series.series_uid,
        job_id=job.id if job else None,
        detail={"reason": reason} if reason else None,
    )
    session.commit()
    log.info(
        "series evaluated series_uid=%s state=%s job_id=%s reason=%s",
        series.series_uid,
        state.value,
        job.id if job else None,
        reason,
    )
    return state, reason, job


class Pipeline:
    """Completion checks, job dispatch, sending with retries, and clean-up for one node."""

    def __init__(
        self,
        config: NodeConfig,
        session_factory: sessionmaker[Session],
        *,
        models: ModelPool | None = None,
        send_max_attempts: int | None = None,
        send_base_delay_s: float | None = None,
        send_max_delay_s: float | None = None,
        dispatch_interval_s: float = 1.0,
        send_interval_s: float = 1.0,
        cleanup_interval_s: float = 3600.0,
    ):
        self.config = config
        self.session_factory = session_factory
        self.concurrency = resolve_concurrency(config.model)
        self.models = models or ModelPool(config.model, size=self.concurrency)
        self.worker = Worker(config, session_factory, self.models)
        # Keyword overrides exist for tests; the config's ``send`` section is the normal source.
        self.send_max_attempts = send_max_attempts or config.send.max_attempts
        self.send_base_delay_s = send_base_delay_s or config.send.base_delay_s
        self.send_max_delay_s = send_max_delay_s or config.send.max_delay_s
        self._intervals = (dispatch_interval_s, send_interval_s, cleanup_interval_s)
        self._scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
        )
        self._work: queue.Queue[int | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._running: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        # APScheduler logs every run at INFO: several lines a second, drowning our own events.
        # Skipped overlapping runs are expected (a long completion check): not worth a warning.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        with self.session_factory() as s:
            recovered = jobs_mod.recover_interrupted(s)
            s.commit()
        if recovered:
            log.warning("requeued interrupted jobs %s", recovered)
        # Load the model now, not when the first series completes (saves seconds of latency).
        threading.Thread(target=self._preload, name="acvtt-preload", daemon=True).start()
        for i in range(self.concurrency):
            t = threading.Thread(target=self._worker_loop, name=f"acvtt-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        dispatch_s, send_s, cleanup_s = self._intervals
        now = datetime.now()
        sch = self._scheduler
        sch.add_job(
            self.check_completion,
            "interval",
            seconds=self.config.completion.check_interval_s,
            id="completion",
            next_run_time=now,
        )
        sch.add_job(self.dispatch, "interval", seconds=dispatch_s, id="dispatch", next_run_time=now)
        sch.add_job(self.send_due, "interval", seconds=send_s, id="send", next_run_time=now)
        sch.add_job(self.clean_up, "interval", seconds=cleanup_s, id="cleanup", next_run_time=now)
        sch.start()
        log.info("pipeline started workers=%d", self.concurrency)

    def _preload(self) -> None:
        try:
            ident = self.models.identity()
            log.info("model loaded model_id=%s version=%s", ident.model_id, ident.model_version)
        except Exception:
            log.exception("model could not be loaded; jobs will fail until it can")

    def shutdown(self) -> None:
        """Stop scheduling. A job still running is left ``running`` and requeued at next start."""
        self._stop.set()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        for _ in self._threads:
            self._work.put(None)
        log.info("pipeline stopped")

    def _wake(self, job_id: str) -> None:
        if self._stop.is_set() or not self._scheduler.running:
            return
        with contextlib.suppress(Exception):  # the job may be gone during shutdown
            self._scheduler.modify_job(job_id, next_run_time=datetime.now())

    # -- completion --------------------------------------------------------------------------
    def check_completion(self) -> None:
        try:
            with self.session_factory() as s:
                queued = False
                for series in due_series(s, self.config):
                    if self._stop.is_set():
                        return
                    try:
                        _, _, job = evaluate_series(s, self.config, series, self.models)
                    except ModelUnavailable as exc:
                        # Not the series' fault: it waits (and is re-checked) until the model
                        # config is fixed; the reason is shown in `series list` and audited once.
                        s.rollback()
                        self._model_unavailable(s, series, str(exc))
                        continue
                    except Exception:
                        s.rollback()
                        log.exception("completion check failed series_uid=%s", series.series_uid)
                        continue
                    queued = queued or job is not None
            if queued:
                self._wake("dispatch")
        except Exception:
            log.exception("completion check failed")

    def _model_unavailable(self, session: Session, series: Series, error: str) -> None:
        reason = f"waiting: model unavailable ({error})"[:1000]
        if series.state_reason == reason:
            return
        series.state_reason = reason
        audit(session, "model_unavailable", series_uid=series.series_uid, detail=error)
        session.commit()
        log.error(
            "model unavailable, series waits series_uid=%s error=%s", series.series_uid, error
        )

    # -- dispatch ----------------------------------------------------------------------------
    def dispatch(self) -> None:
        try:
            with self._lock:
                free = self.concurrency - len(self._running)
            if free <= 0:
                return
            with self.session_factory() as s:
                for job in jobs_mod.next_queued(s, free):
                    if jobs_mod.claim(s, job.id):
                        s.commit()
                        with self._lock:
                            self._running.add(job.id)
                        self._work.put(job.id)
        except Exception:
            log.exception("dispatch failed")

    def _worker_loop(self) -> None:
        while True:
            job_id = self._work.get()
            if job_id is None:
                return
            try:
                state = self.worker.run(job_id)
            finally:
                with self._lock:
                    self._running.discard(job_id)
            if state is JobState.written:
                self._wake("send")
            self._wake("dispatch")

    # -- sending -----------------------------------------------------------------------------
    def send_due(self) -> None:
        try:
            now = utcnow()
            with self.session_factory() as s:
                due = s.scalars(
                    select(Job.id)
                    .where(Job.state == JobState.written)
                    .where((Job.next_send_at.is_(None)) | (Job.next_send_at <= now))
                    .order_by(Job.priority.desc(), Job.id)
                ).all()
            for job_id in due:
                if self._stop.is_set():
                    return
                self.send_job(job_id)
        except Exception:
            log.exception("send loop failed")

    def send_job(self, job_id: int) -> JobState:
        """One send attempt of a written job to all its destinations; returns the new state."""
        from dicom_node.send import (
            FailureKind,
            destination_from_config,
            next_retry_delay,
            send_instances,
        )

        node = self.config.node
        with self.session_factory() as s:
            job = s.get(Job, job_id)
            if job is None or job.state is not JobState.written:
                return job.state if job else JobState.failed
            files = [
                Path(job.derived_dir or "") / f
                for f in (job.summary or {}).get("derived_files", [])
            ]
            missing = [f for f in files if not f.exists()]
            if not files or missing:
                jobs_mod.transition(
                    s, job, JobState.failed, f"derived files missing ({len(missing)}); reprocess"
                )
                s.commit()
                return JobState.failed
            failure_kind, reasons, elapsed = None, [], 0.0
            for name in job.destinations or []:
                try:
                    dcfg = self.config.destination(name)
                except KeyError:
                    failure_kind = FailureKind.PERMANENT
                    reasons.append(f"{name}: destination is no longer configured")
                    continue
                dest = destination_from_config(dcfg)
                acked = jobs_mod.acknowledged(s, job, name)
                res = send_instances(
                    dest,
                    files,
                    calling_ae_title=node.ae_title,
                    already_acknowledged=acked,
                    acse_timeout=node.acse_timeout_s,
                    dimse_timeout=node.dimse_timeout_s,
                    network_timeout=node.network_timeout_s,
                )
                elapsed += res.elapsed_s
                for o in res.outcomes:
                    if o.sent_now and o.acknowledged:
                        jobs_mod.record_ack(s, job, name, o.sop_instance_uid, o.status or 0)
                audit(
                    s,
                    "send_attempt",
                    series_uid=job.source_series_uid,
                    job_id=job.id,
                    peer=str(dest),
                    detail={
                        "sent_now": len(res.sent_now),
                        "acknowledged": len(res.acknowledged),
                        "of": len(files),
                        "failure": res.failure.reason if res.failure else None,
                        "seconds": round(res.elapsed_s, 3),
                    },
                )
                if not res.ok:
                    kind = res.failure.kind if res.failure else FailureKind.TRANSIENT
                    if failure_kind is not FailureKind.PERMANENT:
                        failure_kind = kind
                    reasons.append(
                        f"{name}: {res.failure.reason if res.failure else 'not all acknowledged'}"
                    )
            stages = dict(job.stage_seconds or {})
            stages["send"] = round(stages.get("send", 0.0) + elapsed, 3)
            job.stage_seconds = stages
            job.send_attempts = (job.send_attempts or 0) + 1
            reason = "; ".join(reasons)
            if failure_kind is None:
                note = None if job.destinations else "no destinations: kept locally"
                jobs_mod.transition(s, job, JobState.sent, note, next_send_at=None)
                ser = s.get(Series, job.series_id)
                if ser is not None and ser.state is SeriesState.complete:
                    ser.state = SeriesState.processed
                new = JobState.sent
            elif failure_kind is FailureKind.PERMANENT:
                jobs_mod.transition(s, job, JobState.failed, f"send failed permanently: {reason}")
                new = JobState.failed
            elif job.send_attempts >= self.send_max_attempts:
                jobs_mod.transition(
                    s,
                    job,
                    JobState.failed,
                    f"send gave up after {job.send_attempts} attempts: {reason}",
                )
                new = JobState.failed
            else:
                delay = next_retry_delay(
                    job.send_attempts - 1, self.send_base_delay_s, self.send_max_delay_s
                )
                jobs_mod.schedule_send_retry(s, job, delay, reason)
                new = JobState.written
            s.commit()
        log.info("send job_id=%s state=%s reason=%s", job_id, new.value, reason or None)
        return new

    # -- clean-up ----------------------------------------------------------------------------
    def clean_up(self, now: datetime | None = None) -> int:
        """Remove files older than the retention period whose jobs are finished; returns the
        number of files removed. Index and job rows stay (history)."""
        days = self.config.storage.retention_days
        if days <= 0:
            return 0
        cutoff = (now or utcnow()) - timedelta(days=days)
        spool_root = Path(self.config.storage.spool_dir).resolve()
        busy = (JobState.queued, JobState.running, JobState.written)
        removed = 0
        try:
            with self.session_factory() as s:
                old_series = s.scalars(select(Series).where(Series.last_received < cutoff)).all()
                for ser in old_series:
                    active = s.scalars(
                        select(Job.id).where(Job.series_id == ser.id, Job.state.in_(busy))
                    ).first()
                    if active is not None or ser.state in (
                        SeriesState.receiving,
                        SeriesState.changed,
                    ):
                        continue
                    for inst in s.scalars(select(Instance).where(Instance.series_id == ser.id)):
                        p = spool_root / inst.file_path
                        if p.exists():
                            p.unlink()
                            removed += 1
                old_jobs = s.scalars(
                    select(Job).where(Job.updated_at < cutoff, Job.state.not_in(busy))
                ).all()
                for job in old_jobs:
                    if job.derived_dir and Path(job.derived_dir).exists():
                        removed += sum(1 for _ in Path(job.derived_dir).iterdir())
                        shutil.rmtree(job.derived_dir, ignore_errors=True)
                if removed:
                    audit(s, "retention_cleanup", detail={"files": removed, "cutoff": cutoff})
                    s.commit()
        except Exception:
            log.exception("clean-up failed")
        if removed:
            log.info("retention clean-up removed %d files", removed)
        return removed
