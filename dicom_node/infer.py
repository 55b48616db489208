"""The inference worker: run one job from the source files to a written derived series.

:class:`ModelPool` keeps loaded interpolators between jobs (one per concurrent worker, because an
``Interpolator`` is not thread-safe). :class:`Worker.run` takes a job that the dispatcher has
already moved to ``running`` and does: re-plan exactly the job's instance set -> load (HU) ->
interpolate -> write (``write.py``) -> preview (``preview.py``), recording the seconds of every
stage in ``job.stage_seconds``. It never raises: an unusable input ends ``rejected``, anything
else ``failed``, each with a reason. On success the job is ``written`` and the send loop takes
over.

When no trained weights exist (no checkpoint configured and none shipped) the pool falls back to
an *untrained* model (``model_version == "untrained"``) so that the pipeline still runs end to
end; every job made that way says so in ``job.summary["model_note"]``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.complete import plan_indexed_series
from dicom_node.config import ModelSection, NodeConfig, RuleAction
from dicom_node.db import Job, JobState, SentInstance, Series, SeriesState, audit, utcnow
from dicom_node.health import Health
from dicom_node.jobs import holds, transition
from dicom_node.load import LoadError, SourceUnreadable, load_series
from dicom_node.plan import Rejection, SeriesPlan
from dicom_node.preview import write_preview_png
from dicom_node.spool import to_stored
from dicom_node.web import metrics
from dicom_node.write import SourceImage, write_derived_series

__all__ = [
    "ModelIdentity",
    "ModelPool",
    "ModelUnavailable",
    "Worker",
    "apply_torch_threads",
    "derived_root",
    "interpolate_in_model_order",
    "torch_threads",
]

log = logging.getLogger(__name__)

UNTRAINED_NOTE = (
    "no trained ACVTT weights were found (model.checkpoint unset and none shipped): "
    "this series was made by an UNTRAINED model; do not use it clinically"
)


class ModelUnavailable(RuntimeError):
    """The configured model cannot be loaded (missing or mismatched checkpoint, no CUDA...)."""


@dataclass(frozen=True)
class ModelIdentity:
    model_id: str
    model_version: str
    note: str | None = None


def derived_root(config: NodeConfig) -> Path:
    """Where derived series (and their previews) are written: ``<spool>/derived``."""
    return config.storage.spool_root / "derived"


_interop_lock = threading.Lock()
_interop_sized = False  # torch sizes its inter-op pool once per process


def apply_torch_threads(threads: int | None) -> None:
    """Give torch ``threads`` CPU threads in this process (``model.torch_threads``); None keeps
    torch's default. Called before a model loads, so before this process's first torch work."""
    global _interop_sized
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
    with _interop_lock:
        if _interop_sized:
            return
        _interop_sized = True
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError as exc:  # inter-op work already ran here: only intra-op changes
            log.warning("torch inter-op threads stay as they are: %s", exc)


def torch_threads() -> int | None:
    """The CPU threads torch uses in this process; None while torch is not loaded."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def _load_interpolator(model: ModelSection):
    # Imported here, not at the top: acvtt_core.infer loads torch (about 2 s), which the CLI's
    # other commands and a node without jobs never need.
    from acvtt_core.infer import load_interpolator

    apply_torch_threads(model.torch_threads)
    settings = {
        "device": model.device,
        "preset": model.preset,
        "flip_ensemble": model.flip_ensemble,
    }
    try:
        return load_interpolator(model.checkpoint, **settings), None
    except FileNotFoundError:
        if model.checkpoint is not None:
            raise  # an explicitly configured checkpoint must exist
        log.warning("no default ACVTT weights: using an untrained model")
        return load_interpolator(None, allow_random_init=True, **settings), UNTRAINED_NOTE


def cuda_device_count(device: str) -> int:
    """CUDA GPUs the ``model.device`` setting can use (0 for ``cpu`` or without CUDA)."""
    if device == "cpu":
        return 0
    try:
        import torch  # here, inside the try: a broken torch install must not stop the node

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:  # a broken torch must not stop the node; loading reports it
        log.warning("cannot count CUDA devices: %s", exc)
        return 0


def resolve_concurrency(model: ModelSection, n_gpus: int | None = None) -> int:
    """``model.concurrency``, or by default one job per CUDA GPU (one job without a GPU)."""
    if model.concurrency is not None:
        return model.concurrency
    return max(1, cuda_device_count(model.device) if n_gpus is None else n_gpus)


def device_for_slot(device: str, slot: int, n_gpus: int) -> str:
    """The device of the ``slot``-th loaded model: with several GPUs, the models take them in
    turn (``cuda:0``, ``cuda:1``, ...); otherwise the configured device."""
    if n_gpus > 1 and device in ("auto", "cuda"):
        return f"cuda:{slot % n_gpus}"
    return device


class ModelPool:
    """Up to ``size`` loaded interpolators, created on first use and kept between jobs; with
    several GPUs each one is loaded on its own GPU."""

    def __init__(self, model: ModelSection, size: int = 1, loader: Callable | None = None):
        self.model = model
        self.size = max(1, size)
        self._loader = loader or _load_interpolator
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._created = 0
        self._lock = threading.Lock()
        self._identity: ModelIdentity | None = None
        self.last_error: str | None = None  # why the last load failed (shown by /readyz)

    def _create(self, slot: int):
        n_gpus = cuda_device_count(self.model.device) if self.size > 1 else 0
        device = device_for_slot(self.model.device, slot, n_gpus)
        model = (
            self.model
            if device == self.model.device
            else self.model.model_copy(update={"device": device})
        )
        try:
            interp, note = self._loader(model)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise ModelUnavailable(self.last_error) from exc
        ident = ModelIdentity(str(interp.model_id), str(interp.model_version), note)
        with self._lock:
            self._identity = self._identity or ident
        return interp

    @property
    def loaded(self) -> ModelIdentity | None:
        """The model's identity once one is loaded; None before (never loads one)."""
        return self._identity

    def identity(self) -> ModelIdentity:
        """The model's id and version (loads one interpolator the first time)."""
        if self._identity is None:
            self.release(self.acquire())
        assert self._identity is not None
        return self._identity

    def acquire(self):
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            create = self._created < self.size
            if create:
                slot = self._created
                self._created += 1
        if create:
            try:
                return self._create(slot)
            except BaseException:
                with self._lock:
                    self._created -= 1
                raise
        return self._idle.get()

    def release(self, interp) -> None:
        self._idle.put(interp)


@dataclass
class JobOutput:
    """What a job run hands to delivery: typed columns, plus figures for display."""

    derived_series_uid: str
    derived_dir: str  # relative to the spool root, as the database keeps it
    derived_files: list[str]
    preview_path: str | None  # relative to the spool root too
    display: dict

    def apply(self, job: Job) -> None:
        job.derived_series_uid = self.derived_series_uid
        job.derived_dir = self.derived_dir
        job.derived_files = list(self.derived_files)
        job.preview_path = self.preview_path
        job.next_send_at = None
        job.send_failing_since = None
        job.summary = {**(job.summary or {}), **self.display}


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def stage(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = round(
                    timer.seconds.get(name, 0.0) + time.perf_counter() - self.t0, 3
                )

        return _Ctx()


class Worker:
    """Runs jobs; one instance serves every worker thread of the pipeline."""

    # How often a result that could not be committed (disk or database full, locked) is tried
    # again; the job stays ``running`` meanwhile and the health report shows why.
    RECORD_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)
    # A job whose result could not be recorded is queued again this many times, then failed.
    MAX_ATTEMPTS = 3

    def __init__(
        self,
        config: NodeConfig,
        session_factory: sessionmaker[Session],
        models: ModelPool,
        *,
        health: Health | None = None,
        stop: threading.Event | None = None,
        node_id: str | None = None,
    ):
        self.config = config
        self.session_factory = session_factory
        self.models = models
        self.health = health or Health()
        self.stop = stop or threading.Event()
        self.node_id = node_id or config.node.node_id

    def run(self, job_id: int) -> JobState:
        """Run a ``running`` job to ``written`` (or ``failed``/``rejected``); returns the state.

        Never raises. When even recording the outcome fails (a full disk fails the commit), the
        outcome is retried until the database takes it; the job then goes back to the queue
        (or fails after :attr:`MAX_ATTEMPTS`) with the reason, and the worker carries on.
        """
        name = threading.current_thread().name
        timer = _Timer()
        t_start = utcnow()
        try:
            state = self._run(job_id, timer, t_start)
        except Exception as exc:
            log.exception("job failed job_id=%s", job_id)
            state = self._record_until_possible(job_id, exc, timer, t_start)
        self.health.ok(name)
        return state

    def _record_until_possible(
        self, job_id: int, exc: Exception, timer: _Timer, t_start
    ) -> JobState:
        name = threading.current_thread().name
        for i in itertools.count():
            try:
                return self._finish_after_error(job_id, exc, timer, t_start)
            except Exception as again:
                why = f"cannot record the outcome of job {job_id}: {type(again).__name__}: {again}"
                self.health.failed(name, why)
                log.error("%s; retrying", why)
                delay = self.RECORD_RETRY_S[min(i, len(self.RECORD_RETRY_S) - 1)]
                if self.stop.wait(delay):
                    # Shutting down: the job stays ``running`` and is requeued at start-up.
                    return JobState.running
        raise AssertionError("unreachable")  # pragma: no cover

    def _finish_after_error(self, job_id: int, exc: Exception, timer: _Timer, t_start) -> JobState:
        """An unexpected error (not the input's fault): fail the job, or queue it again if the
        error was the environment's (disk, database) and attempts remain."""
        reason = f"{type(exc).__name__}: {exc}"[:1000]
        with self.session_factory() as s:
            job = s.get(Job, job_id)
            if job is None or job.state is not JobState.running:
                return job.state if job is not None else JobState.failed
            environmental = isinstance(exc, OSError | OperationalError)
            if environmental and job.attempts < self.MAX_ATTEMPTS:
                state, why = JobState.queued, f"requeued after an error: {reason}"
            else:
                state, why = JobState.failed, reason
        return self._finish(job_id, state, why, timer, t_start)

    def _finish(
        self,
        job_id: int,
        state: JobState,
        reason: str | None,
        timer: _Timer,
        t_start,
        *,
        output: JobOutput | None = None,
    ) -> JobState:
        with self.session_factory() as s:
            # Locked until the commit: a reaper cannot take the job over in between.
            job = s.get(Job, job_id, with_for_update=True)
            if job is None:
                return state
            if job.state is not JobState.running or not holds(job, self.node_id):
                # The lease ran out (this node was cut off or too slow to renew) and the job was
                # queued again or taken over: the outcome is another run's to record.
                log.warning(
                    "job no longer held; outcome not recorded job_id=%s state=%s holder=%s",
                    job_id,
                    job.state.value,
                    job.claimed_by,
                )
                return job.state
            stages = {**(job.stage_seconds or {}), **timer.seconds}
            series_uid = job.source_series_uid
            transition(s, job, state, reason, stage_seconds=stages)
            if output is not None:
                output.apply(job)
            if state is JobState.rejected:
                ser = s.get(Series, job.series_id)
                if ser is not None and ser.state is SeriesState.complete:
                    ser.state, ser.state_reason = SeriesState.rejected, reason
            s.commit()
        metrics.job_stages(timer.seconds, job_id=job_id, series_uid=series_uid)
        log.info(
            "job finished job_id=%s state=%s stages=%s reason=%s",
            job_id,
            state.value,
            timer.seconds,
            reason,
        )
        return state

    def _run(self, job_id: int, timer: _Timer, t_start) -> JobState:
        with self.session_factory() as s:
            job = s.get(Job, job_id)
            if job is None or job.state is not JobState.running or not holds(job, self.node_id):
                return job.state if job is not None else JobState.failed
            series = s.get(Series, job.series_id)
            assert series is not None
            queued_at = job.updated_at or job.created_at
            timer.seconds["queue_wait"] = round(max(0.0, (t_start - queued_at).total_seconds()), 3)
            with timer.stage("plan"):
                plan = plan_indexed_series(
                    series, self.config, only_sop_uids=job.source_sop_uids or None
                )
            factor, model_id, model_version = job.factor, job.model_id, job.model_version
            job_key = (job.source_series_uid, job.instances_hash)
            action = self._rule_action(job.rule_name)
            replaces = delivered_predecessor(s, job)
        if isinstance(plan, Rejection):
            return self._finish(job_id, JobState.rejected, plan.reason, timer, t_start)

        log.info(
            "job started job_id=%s series_uid=%s slices=%d factor=%d",
            job_id,
            job_key[0],
            plan.n_slices,
            factor,
        )
        with timer.stage("load"):
            try:
                loaded = load_series(plan)
            except LoadError as exc:
                return self._finish(job_id, JobState.rejected, str(exc), timer, t_start)
            except SourceUnreadable as exc:
                # Failed, not rejected: the series is fine, this node cannot see it. Once the
                # spool is back, a reprocess runs the same job.
                why = (
                    f"{exc.n_files} of {exc.n_total} source file(s) cannot be read on node "
                    f"{self.node_id}: {exc.first}; this node must mount the shared spool at "
                    f"{self.config.storage.spool_root} (docs/SCALING.md)"
                )
                return self._finish(job_id, JobState.failed, why, timer, t_start)

        interp = self.models.acquire()
        try:
            if (str(interp.model_id), str(interp.model_version)) != (model_id, model_version):
                return self._finish(
                    job_id,
                    JobState.failed,
                    f"job needs model {model_id} {model_version} but "
                    f"{interp.model_id} {interp.model_version} is loaded; reprocess the series",
                    timer,
                    t_start,
                )
            with timer.stage("inference"):
                volume = interpolate_in_model_order(
                    interp,
                    loaded.volume,
                    factor,
                    ascending=plan.ascending_along_normal,
                    progress=_progress_logger(job_id),
                )
        finally:
            self.models.release(interp)

        if not self._still_held(job_id):
            # Inference outlived the lease (this node was cut off from the database): another
            # node runs the job now, and its files in the same folder must not be touched.
            log.warning("job taken over during inference; nothing written job_id=%s", job_id)
            return JobState.running  # another node's run (or the queue's) now
        out_dir = derived_root(self.config) / f"job-{job_id}"
        with timer.stage("write"):
            derived_uid, files, writer_notes = self._write(
                plan,
                loaded.headers,
                volume,
                factor,
                (model_id, model_version),
                action,
                out_dir,
                replaces_delivered=replaces is not None,
            )
        preview_path: str | None = None
        with timer.stage("preview"):
            preview_path = self._preview(loaded.volume, volume, plan, factor, out_dir)
        spool_root = self.config.storage.spool_root
        output = JobOutput(
            derived_series_uid=derived_uid,
            derived_dir=to_stored(out_dir, spool_root),
            derived_files=files,
            preview_path=to_stored(preview_path, spool_root) if preview_path else None,
            display={
                "n_in": plan.n_slices,
                "n_out": int(volume.shape[0]),
                "spacing_in_mm": round(plan.spacing_mm, 4),
                "spacing_out_mm": round(plan.spacing_mm / factor, 4),
                "plan": plan.summary(),
                **({"replaces_delivered_job": replaces} if replaces is not None else {}),
                **({"writer_notes": writer_notes} if writer_notes else {}),
            },
        )
        return self._finish(job_id, JobState.written, None, timer, t_start, output=output)

    def _still_held(self, job_id: int) -> bool:
        with self.session_factory() as s:
            job = s.get(Job, job_id)
            return job is not None and job.state is JobState.running and holds(job, self.node_id)

    def _rule_action(self, rule_name: str | None):
        for rule in self.config.rules:
            if rule.name == rule_name:
                return rule.action
        return None

    def _write(
        self,
        plan: SeriesPlan,
        headers: list[Dataset],
        volume: np.ndarray,
        factor: int,
        model: tuple[str, str],
        action,
        out_dir: Path,
        *,
        replaces_delivered: bool = False,
    ) -> tuple[str, list[str], list[str]]:
        """Write the derived series; returns its UID, its file names and the writer's notes
        (source values it repaired or left out: attribute names, never values)."""
        model_id, model_version = model
        template = (
            action.series_description
            if action
            else RuleAction.model_fields["series_description"].default
        )
        if replaces_delivered:
            # A prefix, because the writer cuts descriptions at 64 characters: whoever opens
            # the study sees which of the two derived series is the current one.
            template = REPLACES_PREFIX + template
        if out_dir.exists():
            for old in out_dir.glob("*.dcm"):  # a reprocess rewrites the same UIDs
                old.unlink()
        derived = write_derived_series(
            [SourceImage(ds, ref.frame) for ref, ds in zip(plan.slices, headers, strict=True)],
            volume,
            factor=factor,
            model_id=model_id,
            model_version=model_version,
            series_number_offset=action.series_number_offset if action else 1000,
            description_template=template,
            out_dir=out_dir,
            slice_vector=plan.slice_vector,
            spacing_mm=plan.spacing_mm,
        )
        for note in derived.notes:  # attribute names and repairs only, never values
            log.warning("writer repaired a source value series_uid=%s: %s", plan.series_uid, note)
        files = [Path(ds.filename).name for ds in derived.datasets]
        return derived.series_uid, files, list(derived.notes)

    def _preview(
        self, thick: np.ndarray, thin: np.ndarray, plan: SeriesPlan, factor: int, out_dir: Path
    ) -> str | None:
        try:
            if float(np.dot(plan.slice_vector, plan.normal)) < 0:
                # preview.py draws index 0 at the bottom: give it the stack ascending along n.
                thick, thin = thick[::-1], thin[::-1]
            row_mm, col_mm = (float(v) for v in plan.pixel_spacing)
            info = write_preview_png(
                thick,
                thin,
                (plan.spacing_mm, row_mm, col_mm),
                (plan.spacing_mm / factor, row_mm, col_mm),
                out_dir / "preview.png",
            )
            return str(info.path)
        except Exception as exc:  # a preview must never fail the job
            log.warning("preview failed: %s", exc)
            return None


def interpolate_in_model_order(
    interp,
    volume: np.ndarray,
    factor: int,
    ascending: bool,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Interpolate a (D, H, W) volume given in plan order, feeding the model its slices in
    ascending order along the slice normal and returning the result in plan order.

    ACVTT is not symmetric in z: it was trained and evaluated on volumes read by SimpleITK, whose
    slices ascend along the normal, and the same series fed head-down scores differently (a held-
    out chest CT at x4: -0.28 dB; docs/MODEL.md). Sources that number slices the other way (most
    head-first CTs) are therefore reversed for the model and back afterwards.
    """
    if ascending:
        return interp.interpolate(volume, factor, progress=progress)
    # Reversed views, not copies: the interpolator normalises into a new array anyway, and the
    # writer reads the result slice by slice.
    return interp.interpolate(volume[::-1], factor, progress=progress)[::-1]


def _progress_logger(job_id: int) -> Callable[[int, int], None]:
    last = [-1]

    def cb(done: int, total: int) -> None:
        q = int(4 * done / max(total, 1))
        if q != last[0]:
            last[0] = q
            log.info("inference progress job_id=%s %d/%d", job_id, done, total)

    return cb


REPLACES_PREFIX = "REPLACES EARLIER: "


def delivered_predecessor(session: Session, job: Job) -> int | None:
    """The id of the job this one supersedes if that job already delivered anything (its
    derived series, perhaps of a partial source series, is in PACS), else None."""
    if job.supersedes_job_id is None:
        return None
    prev = session.get(Job, job.supersedes_job_id)
    if prev is None:
        return None
    delivered = prev.state is JobState.sent and bool(prev.destinations)
    if not delivered:
        delivered = (
            session.scalars(
                select(SentInstance.id).where(SentInstance.job_id == prev.id).limit(1)
            ).first()
            is not None
        )
    return prev.id if delivered else None


def record_untrained(session: Session, job: Job, note: str | None) -> None:
    """Stamp a job made with the untrained fallback (shown by ``jobs show``)."""
    if note:
        job.summary = {**(job.summary or {}), "model_note": note}
        audit(session, "untrained_model", job_id=job.id, series_uid=job.source_series_uid)
