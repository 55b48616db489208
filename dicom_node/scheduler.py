"""The processing pipeline: APScheduler drives completion, dispatch, sending and clean-up.

:class:`Pipeline` (started by :class:`dicom_node.node.Node` next to the receiver) runs five
periodic tasks on a ``BackgroundScheduler``; each keeps its state in the database, so the node can
stop at any moment and pick up where it left off. This module only schedules: a send attempt is
deliver.py's, clean-up is retention.py's, a job run is infer.py's.

* **completion** (every ``completion.check_interval_s``): quiet series -> plan (complete.py) ->
  rule (rules.py) -> job (jobs.py). Unusable series become ``rejected`` and series that no rule
  wants ``ignored``, both with a reason. A state change is committed only if no instance arrived
  while the series was being checked (``Series.revision`` unchanged); otherwise it waits for the
  next quiet period.
* **dispatch** (every second, and at once after a job is queued): claims queued jobs, highest
  priority first, while fewer than ``model.concurrency`` run, and hands them to worker threads
  (infer.py), which keep their models loaded between jobs.
* **send** (every second, and at once after a job is written): one delivery attempt per due job
  (deliver.py: only unacknowledged instances go out, acknowledgements are recorded as they arrive,
  transient failures are retried with backoff for ``send.retry_window_s``).
* **leases** (every ``node.lease_s / 3``, at most 10 s): running jobs whose lease expired, on
  whichever node, go back to the queue (jobs.reap_expired). A heartbeat thread of its own renews
  the leases of the jobs this node runs or sends, so that a long inference never loses one.
* **clean-up** (hourly): retention.py.

Several nodes may share one PostgreSQL database: dispatch claims jobs (``claimed_by`` = this
node's ``node.id``, with a lease; ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL), and a
send attempt claims its job the same way, so no two nodes run or send the same job at once.
Completion checks and clean-up run on one node at a time (a PostgreSQL advisory lock per task,
db.one_node_at_a_time); the other nodes skip those passes.
``node.role`` splits the work: a ``receiver`` runs completion (and clean-up), a ``worker``
dispatch, send and leases with the worker threads and the heartbeat; ``all`` (the default) runs
everything.

Every loop survives any exception: it logs it, records the reason on the job or series where
there is one, reports to :class:`~dicom_node.health.Health` (a loop failing for a minute makes
the node unhealthy in ``dicom-node status`` and ``dicom-node health``) and runs again.

At start-up, jobs that this node (the same ``node.id``) left ``running`` go back to ``queued`` at
once; jobs that other live nodes hold are left alone. Series that were still
arriving are held back (the quiet period starts again; after a crash they wait
``completion.interrupted_hold_s``), so that a series cut off by the crash is not processed as if
it were complete.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import db, retention
from dicom_node import jobs as jobs_mod
from dicom_node.complete import due_series, hold_unfinished_series, plan_indexed_series
from dicom_node.config import NodeConfig
from dicom_node.db import Job, JobState, Series, SeriesState, audit, utcnow
from dicom_node.deliver import RetryPolicy, deliver_job
from dicom_node.health import Health
from dicom_node.infer import (
    ModelPool,
    ModelUnavailable,
    Worker,
    record_untrained,
    resolve_concurrency,
    torch_threads,
)
from dicom_node.plan import Rejection
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
    plan = plan_indexed_series(series, config)
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
        send_base_delay_s: float | None = None,
        dispatch_interval_s: float = 1.0,
        send_interval_s: float = 1.0,
        cleanup_interval_s: float = 3600.0,
        previous_run_crashed: bool = False,
        health: Health | None = None,
    ):
        self.config = config
        self.session_factory = session_factory
        self.concurrency = resolve_concurrency(config.model)
        self.models = models or ModelPool(config.model, size=self.concurrency)
        self.health = health or Health()
        self._stop = threading.Event()
        # Several nodes may share the database: every job this node runs or sends is claimed
        # under its id with a lease that the heartbeat renews.
        self.node_id = config.node.node_id
        self.lease_s = config.node.lease_s
        self.role = config.node.role
        self._engine = session_factory.kw.get("bind") or session_factory().get_bind()
        self.worker = Worker(
            config,
            session_factory,
            self.models,
            health=self.health,
            stop=self._stop,
            node_id=self.node_id,
        )
        # The keyword override exists for tests; the config's ``send`` section is the source.
        policy = RetryPolicy.from_config(config.send)
        if send_base_delay_s is not None:
            policy = RetryPolicy(
                send_base_delay_s, policy.max_delay_s, policy.retry_window_s, policy.max_attempts
            )
        self.retry_policy = policy
        self.previous_run_crashed = previous_run_crashed
        self._intervals = (dispatch_interval_s, send_interval_s, cleanup_interval_s)
        self._scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
        )
        self._work: queue.Queue[int | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._running: set[int] = set()
        self._sending: set[int] = set()
        self._lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        # APScheduler logs every run at INFO: several lines a second, drowning our own events.
        # Skipped overlapping runs are expected (a long completion check): not worth a warning.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        receives, works = self.role in ("all", "receiver"), self.role in ("all", "worker")
        self._recover(receives=receives, works=works)
        if works:
            self._start_workers()
        dispatch_s, send_s, cleanup_s = self._intervals
        tasks: list[tuple[str, Callable[[], object], float]] = [
            ("cleanup", self.clean_up, cleanup_s)
        ]
        if receives:
            tasks.append(
                ("completion", self.check_completion, self.config.completion.check_interval_s)
            )
        if works:
            tasks += [
                ("dispatch", self.dispatch, dispatch_s),
                ("send", self.send_due, send_s),
                ("leases", self.reap_expired_leases, max(0.5, min(self.lease_s / 3, 10.0))),
            ]
        now = datetime.now()
        for name, fn, interval in tasks:
            self.health.register(name, interval)
            self._scheduler.add_job(
                self._guarded(name, fn), "interval", seconds=interval, id=name, next_run_time=now
            )
        self._scheduler.start()
        log.info("pipeline started role=%s workers=%d", self.role, self.concurrency if works else 0)

    def _start_workers(self) -> None:
        # Load the model now, not when the first series completes (saves seconds of latency).
        threading.Thread(target=self._preload, name="acvtt-preload", daemon=True).start()
        for i in range(self.concurrency):
            self._threads.append(self._start_worker_thread(i))
        # Its own thread, not a scheduler task: a busy scheduler or a long CPU inference must
        # never let a lease lapse while the job is still being worked on.
        self.health.register("heartbeat", self.lease_s / 3)
        self._heartbeat = threading.Thread(
            target=self._heartbeat_loop, name="lease-heartbeat", daemon=True
        )
        self._heartbeat.start()

    def _recover(self, *, receives: bool = True, works: bool = True) -> None:
        """A worker requeues the jobs it was running when it stopped (other nodes' jobs wait
        for their leases); a receiver holds back series that were still arriving."""
        completion = self.config.completion
        wait, why = (
            (completion.interrupted_hold_s, "the node stopped while the series was arriving")
            if self.previous_run_crashed
            else (completion.quiet_seconds, None)  # routine restart: the quiet period restarts
        )
        try:
            with self.session_factory() as s:
                recovered = jobs_mod.reclaim_own(s, self.node_id) if works else []
                held = (
                    hold_unfinished_series(s, utcnow() + timedelta(seconds=wait), why)
                    if receives
                    else 0
                )
                s.commit()
        except Exception as exc:
            # The loops retry against the database; the health report shows why.
            log.exception("start-up recovery failed")
            self.health.failed("startup", f"recovery failed: {type(exc).__name__}: {exc}")
            return
        if recovered:
            log.warning("requeued interrupted jobs %s", recovered)
        if held:
            log.warning("held %d unfinished series for %.0f s: %s", held, wait, why or "restart")

    def _start_worker_thread(self, i: int) -> threading.Thread:
        t = threading.Thread(target=self._worker_loop, name=f"acvtt-worker-{i}", daemon=True)
        t.start()
        return t

    def _preload(self) -> None:
        try:
            ident = self.models.identity()
            log.info(
                "model loaded model_id=%s version=%s torch_threads=%s",
                ident.model_id,
                ident.model_version,
                torch_threads(),
            )
        except Exception:
            log.exception("model could not be loaded; jobs will fail until it can")

    def shutdown(self) -> None:
        """Stop scheduling. A job still running is left ``running``: this node takes it back when
        it starts again, another node once its lease has expired."""
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

    def _guarded(self, name: str, fn: Callable[[], object]) -> Callable[[], None]:
        """``fn`` as a scheduler task that never raises and reports every pass to health."""

        def run() -> None:
            try:
                fn()
            except Exception as exc:
                log.exception("%s loop failed", name)
                self.health.failed(name, f"{type(exc).__name__}: {exc}")
            else:
                self.health.ok(name)

        return run

    # -- completion --------------------------------------------------------------------------
    def check_completion(self) -> None:
        """Evaluate every quiet series; a series whose check fails keeps the reason and waits.
        Raises only when the database cannot be read at all (the loop reports it). One node
        at a time checks (the others skip the pass): two would plan the same series at once."""
        with db.one_node_at_a_time(self._engine, "completion") as mine:
            if mine:
                self._check_completion()

    def _check_completion(self) -> None:
        failed: list[str] = []
        queued = False
        with self.session_factory() as s:
            for series in due_series(s, self.config):
                if self._stop.is_set():
                    return
                try:
                    _, _, job = evaluate_series(s, self.config, series, self.models)
                except ModelUnavailable as exc:
                    # Not the series' fault: it waits (and is re-checked) until the model
                    # config is fixed; the reason is shown in `series list` and audited once.
                    s.rollback()
                    self._series_waits(s, series, f"model unavailable ({exc})", "model_unavailable")
                    continue
                except Exception as exc:
                    s.rollback()
                    log.exception("completion check failed series_uid=%s", series.series_uid)
                    failed.append(series.series_uid)
                    self._series_waits(
                        s, series, f"completion check failed ({type(exc).__name__}: {exc})"
                    )
                    continue
                queued = queued or job is not None
        if queued:
            self._wake("dispatch")
        if failed:
            raise RuntimeError(f"completion check failed for {len(failed)} series")

    def _series_waits(
        self, session: Session, series: Series, why: str, audit_kind: str = "completion_failed"
    ) -> None:
        """Show why a series waits (``series list``), audited once per distinct reason."""
        reason = f"waiting: {why}"[:1000]
        if series.state_reason == reason:
            return
        try:
            series.state_reason = reason
            audit(session, audit_kind, series_uid=series.series_uid, detail=why[:1000])
            session.commit()
        except Exception:
            session.rollback()
            log.exception("cannot record why series waits series_uid=%s", series.series_uid)
        log.error("series waits series_uid=%s reason=%s", series.series_uid, why)

    # -- dispatch ----------------------------------------------------------------------------
    def dispatch(self) -> None:
        self._revive_workers()
        with self._lock:
            free = self.concurrency - len(self._running)
        if free <= 0:
            return
        with self.session_factory() as s:
            claimed = jobs_mod.claim_next(s, self.node_id, self.lease_s, free)
            with self._lock:
                self._running.update(claimed)
            try:
                s.commit()
            except Exception:
                with self._lock:
                    self._running.difference_update(claimed)
                raise
        for job_id in claimed:
            self._work.put(job_id)

    def _revive_workers(self) -> None:
        """A worker thread must never end while the pipeline runs; if one did, say so and
        start another, so that one bad job cannot stop the pipeline."""
        for i, t in enumerate(self._threads):
            if not t.is_alive() and not self._stop.is_set():
                log.error("worker thread %s had stopped; starting a new one", t.name)
                self.health.failed(t.name, "worker thread had stopped; restarted")
                self._threads[i] = self._start_worker_thread(i)

    # -- leases ------------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        """Renew the leases of the jobs this node runs or sends, every ``lease_s / 3``."""
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew_leases()
            except Exception as exc:
                log.exception("lease heartbeat failed")
                self.health.failed("heartbeat", f"{type(exc).__name__}: {exc}")
            else:
                self.health.ok("heartbeat")

    def renew_leases(self) -> set[int]:
        """One heartbeat; returns the job ids whose leases were renewed."""
        with self._lock:
            held = self._running | self._sending
        if not held:
            return set()
        with self.session_factory() as s:
            renewed = jobs_mod.renew(s, self.node_id, held, self.lease_s)
            s.commit()
        with self._lock:
            # A job that finished meanwhile is no longer renewed: not a lost lease.
            lost = (held - renewed) & (self._running | self._sending)
        if lost:
            log.warning("leases lost (jobs taken over by other nodes) job_ids=%s", sorted(lost))
        return renewed

    def reap_expired_leases(self) -> list[int]:
        """Queue again the running jobs whose lease expired, whichever node held them."""
        with self.session_factory() as s:
            reaped = jobs_mod.reap_expired(s)
            s.commit()
        if reaped:
            log.warning("requeued jobs whose lease expired %s", reaped)
            self._wake("dispatch")
        return reaped

    def _worker_loop(self) -> None:
        while True:
            job_id = self._work.get()
            if job_id is None:
                return
            try:
                state = self.worker.run(job_id)
            except BaseException as exc:  # Worker.run records its own failures; belt and braces
                log.exception("worker failed job_id=%s", job_id)
                self.health.failed(
                    threading.current_thread().name, f"job {job_id}: {type(exc).__name__}: {exc}"
                )
                state = None
                if not isinstance(exc, Exception):
                    raise
            finally:
                with self._lock:
                    self._running.discard(job_id)
            if state is JobState.written:
                self._wake("send")
            self._wake("dispatch")

    # -- sending -----------------------------------------------------------------------------
    def send_due(self) -> None:
        now = utcnow()
        with self.session_factory() as s:
            due = s.scalars(
                select(Job.id)
                .where(Job.state == JobState.written)
                .where((Job.next_send_at.is_(None)) | (Job.next_send_at <= now))
                .order_by(Job.priority.desc(), Job.id)
            ).all()
        errors = 0
        for job_id in due:
            if self._stop.is_set():
                return
            if not self._claim_send(job_id):
                continue  # another node is sending it
            try:
                deliver_job(self.config, self.session_factory, job_id, policy=self.retry_policy)
            except Exception as exc:
                log.exception("delivery failed job_id=%s", job_id)
                errors += 1
                self._delivery_error(job_id, exc)
            finally:
                self._release_send(job_id)
        if errors:
            raise RuntimeError(f"{errors} delivery attempt(s) failed; reasons are on the jobs")

    def _claim_send(self, job_id: int) -> bool:
        with self.session_factory() as s:
            if not jobs_mod.claim_send(s, job_id, self.node_id, self.lease_s):
                return False
            with self._lock:
                self._sending.add(job_id)
            s.commit()
        return True

    def _release_send(self, job_id: int) -> None:
        with self._lock:
            self._sending.discard(job_id)
        try:
            with self.session_factory() as s:
                jobs_mod.release(s, job_id, self.node_id)
                s.commit()
        except Exception:
            # The lease then simply expires; the next attempt waits until it has.
            log.exception("cannot release the send claim job_id=%s", job_id)

    def _delivery_error(self, job_id: int, exc: Exception) -> None:
        """An attempt that broke (not a peer's answer): retry later, with the reason on the job."""
        reason = f"delivery attempt failed: {type(exc).__name__}: {exc}"[:1000]
        try:
            with self.session_factory() as s:
                job = s.get(Job, job_id)
                if job is not None and job.state is JobState.written:
                    job.send_attempts = (job.send_attempts or 0) + 1
                    delay = min(self.retry_policy.max_delay_s, 30.0)
                    jobs_mod.schedule_send_retry(s, job, delay, reason)
                    s.commit()
        except Exception:
            log.exception("cannot record the delivery failure job_id=%s", job_id)

    # -- clean-up ----------------------------------------------------------------------------
    def clean_up(self, now: datetime | None = None) -> int:
        """Retention clean-up, on one node at a time (0 when another node runs it)."""
        with db.one_node_at_a_time(self._engine, "cleanup") as mine:
            return retention.clean_up(self.config, self.session_factory, now) if mine else 0
