"""The pipeline in-process on a real (tiny) CT series: completion -> job -> worker -> send.

A linear-interpolation stand-in replaces ACVTT so the test runs in seconds; everything else
(planning, loading, the writer, send classification and bookkeeping, supersede) is the real code.
"""

from __future__ import annotations

import shutil
import socket
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from dicom_node import db
from dicom_node.config import parse_config
from dicom_node.db import Instance, Job, JobState, Series, SeriesState, Study, utcnow
from dicom_node.deliver import deliver_job
from dicom_node.infer import ModelPool
from dicom_node.jobs import claim, derived_dir_path, preview_file
from dicom_node.scheduler import Pipeline, evaluate_series, plan_and_queue
from tests.support.postgres import both_databases


class LinearStandIn:
    model_id = "linear-test"
    model_version = "1"

    def interpolate(self, volume, factor, progress=None):
        d = volume.shape[0]
        z = np.arange((d - 1) * factor + 1) / factor
        i0 = np.minimum(np.floor(z).astype(int), d - 2)
        w = (z - i0)[:, None, None]
        return (volume[i0] * (1 - w) + volume[i0 + 1] * w).astype(np.float32)


def _send(pipeline: Pipeline, job_id: int) -> JobState:
    """One delivery attempt, with the pipeline's retry policy."""
    return deliver_job(
        pipeline.config, pipeline.session_factory, job_id, policy=pipeline.retry_policy
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SCP:
    """A pynetdicom C-STORE SCP answering every store with ``status``."""

    def __init__(self, port: int, status: int = 0):
        self.port, self.status, self.received = port, status, []
        ae = AE(ae_title="PACS")
        ae.add_supported_context(CTImageStorage)
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event):
        self.received.append(event.request.AffectedSOPInstanceUID)
        return self.status

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def env(tmp_path, sample_data, database_url):
    port = _free_port()
    config = parse_config(
        {
            "storage": {"spool_dir": str(tmp_path / "spool"), "retention_days": 0},
            "database": {"url": database_url},
            "completion": {"quiet_seconds": 0},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}
            ],
            "rules": [
                {
                    "name": "thick",
                    "match": {"modality": ["CT"], "spacing_mm": [2, 10]},
                    "action": {"target_spacing_mm": 1.25, "destinations": ["pacs"]},
                }
            ],
        }
    )
    db.upgrade(config.database.url)
    engine = db.make_engine(config.database.url)
    sessions = db.make_session_factory(engine)
    models = ModelPool(config.model, loader=lambda _m: (LinearStandIn(), None))
    pipeline = Pipeline(config, sessions, models=models, send_base_delay_s=0.01)
    files = sorted(p for p in Path(sample_data.pydicom_ct5n).iterdir() if p.is_file())
    yield config, sessions, pipeline, files, port
    engine.dispose()


def _index(sessions, config, files):
    """Put files in the spool and index them as the receiver would (geometry fields only)."""
    spool = Path(config.storage.spool_dir)
    with sessions() as s:
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            study = s.scalars(select(Study).where(Study.study_uid == ds.StudyInstanceUID)).first()
            if study is None:
                study = Study(study_uid=ds.StudyInstanceUID)
                s.add(study)
            series = s.scalars(
                select(Series).where(Series.series_uid == ds.SeriesInstanceUID)
            ).first()
            if series is None:
                series = Series(
                    series_uid=ds.SeriesInstanceUID, study=study, modality=ds.Modality, revision=0
                )
                s.add(series)
            rel = Path(ds.StudyInstanceUID) / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
            (spool / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, spool / rel)
            s.add(
                Instance(
                    series=series,
                    sop_class_uid=ds.SOPClassUID,
                    sop_instance_uid=ds.SOPInstanceUID,
                    instance_number=int(ds.InstanceNumber),
                    acquisition_number=int(ds.AcquisitionNumber),
                    image_position=[float(v) for v in ds.ImagePositionPatient],
                    image_orientation=[float(v) for v in ds.ImageOrientationPatient],
                    pixel_spacing=[float(v) for v in ds.PixelSpacing],
                    slice_thickness=float(ds.SliceThickness),
                    rows=ds.Rows,
                    columns=ds.Columns,
                    frame_of_reference_uid=ds.FrameOfReferenceUID,
                    image_type=list(ds.ImageType),
                    transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                    file_path=str(rel),
                    file_size=f.stat().st_size,
                    sha256="0" * 64,
                )
            )
            series.revision += 1
            series.last_received = utcnow() - timedelta(seconds=5)
            if series.state not in (SeriesState.receiving, SeriesState.changed):
                series.state = SeriesState.changed
        s.commit()
        return series.id


def _run_next(pipeline, sessions) -> Job:
    with sessions() as s:
        job = s.scalars(select(Job).where(Job.state == JobState.queued)).first()
        assert claim(s, job.id, pipeline.node_id, 60)
        s.commit()
    assert pipeline.worker.run(job.id) is JobState.written
    with sessions() as s:
        return s.get(Job, job.id)


@both_databases
def test_series_to_sent_and_late_arrival_supersedes(env):
    config, sessions, pipeline, files, port = env
    series_id = _index(sessions, config, files[:4])
    pipeline.check_completion()
    with sessions() as s:
        series = s.get(Series, series_id)
        assert series.state is SeriesState.complete
        job = s.scalars(select(Job)).one()
        assert job.factor == 2 and job.stage_seconds["quiet"] >= 5  # 2.5 mm / 1.25 mm
    job = _run_next(pipeline, sessions)
    derived = derived_dir_path(job, config.storage.spool_root)
    assert job.summary["n_out"] == 7 and len(list(derived.glob("*.dcm"))) == 7
    assert job.preview_path and preview_file(job, config.storage.spool_root).exists()
    # Kept relative to the spool, so that nodes mounting it at other paths find them too.
    assert not Path(job.derived_dir).is_absolute() and not Path(job.preview_path).is_absolute()
    assert {"load", "inference", "write", "preview"} <= set(job.stage_seconds)

    scp = SCP(port)
    try:
        assert _send(pipeline, job.id) is JobState.sent
    finally:
        scp.stop()
    assert len(scp.received) == 7
    with sessions() as s:
        assert s.get(Series, series_id).state is SeriesState.processed

    # A late slice re-opens the series; the new job supersedes the first one.
    _index(sessions, config, files[4:])
    with sessions() as s:
        assert s.get(Series, series_id).state is SeriesState.changed
    pipeline.check_completion()
    with sessions() as s:
        jobs = s.scalars(select(Job).order_by(Job.id)).all()
        assert len(jobs) == 2 and jobs[1].supersedes_job_id == jobs[0].id
        assert jobs[1].instances_hash != jobs[0].instances_hash

    # Same input again: no new job (idempotent), series marked processed once sent.
    with sessions() as s:
        series = s.get(Series, series_id)
        _, _, again = evaluate_series(s, config, series, pipeline.models)
        assert again.id == jobs[1].id

    # The first derived series (of the partial source) is in PACS already: the new one says
    # that it replaces it, where a person browsing the study sees it first.
    second = _run_next(pipeline, sessions)
    assert second.id == jobs[1].id and second.summary["replaces_delivered_job"] == jobs[0].id
    first_file = sorted(derived_dir_path(job, config.storage.spool_root).glob("*.dcm"))[0]
    new_file = sorted(derived_dir_path(second, config.storage.spool_root).glob("*.dcm"))[0]
    old_desc = str(pydicom.dcmread(first_file, stop_before_pixels=True).SeriesDescription)
    new_desc = str(pydicom.dcmread(new_file, stop_before_pixels=True).SeriesDescription)
    assert not old_desc.startswith("REPLACES") and new_desc.startswith("REPLACES EARLIER: ")


@both_databases
def test_send_failures_transient_retry_and_permanent_fail_at_once(env):
    config, sessions, pipeline, files, port = env
    _index(sessions, config, files)
    pipeline.check_completion()
    job = _run_next(pipeline, sessions)

    # Nobody listening: transient, retried later.
    assert _send(pipeline, job.id) is JobState.written
    with sessions() as s:
        j = s.get(Job, job.id)
        assert j.send_attempts == 1 and j.next_send_at is not None and j.reason

    # Out of resources (0xA700) on every instance: permanent, the job fails at once.
    scp = SCP(port, status=0xA700)
    try:
        with sessions() as s:
            s.get(Job, job.id).next_send_at = None
            s.commit()
        assert _send(pipeline, job.id) is JobState.failed
        assert len(scp.received) == 1  # stopped at the first refusal, no storm
    finally:
        scp.stop()
    with sessions() as s:
        j = s.get(Job, job.id)
        assert j.state is JobState.failed and "permanently" in j.reason


@both_databases
def test_rejected_and_ignored_series(env, sample_data):
    config, sessions, pipeline, _, _ = env
    gap = sorted(p for p in Path(sample_data.pydicom_ct2).iterdir() if p.is_file())
    sid = _index(sessions, config, gap)
    pipeline.check_completion()
    with sessions() as s:
        series = s.get(Series, sid)
        assert series.state is SeriesState.rejected and "gap" in series.state_reason
        assert s.scalars(select(Job)).first() is None


@both_databases
def test_pipeline_start_recovers_and_stops(env):
    config, sessions, pipeline, files, _ = env
    _index(sessions, config, files)
    pipeline.check_completion()
    with sessions() as s:
        job = s.scalars(select(Job)).one()
        claim(s, job.id, pipeline.node_id, 60)
        s.commit()
    pipeline.start()
    try:
        done = threading.Event()

        def written():
            with sessions() as s:
                return s.get(Job, job.id).state in (JobState.written, JobState.failed)

        for _ in range(100):
            if written():
                done.set()
                break
            threading.Event().wait(0.1)
        assert done.is_set()  # recovered running -> queued, then dispatched and run
        with sessions() as s:
            assert s.get(Job, job.id).attempts == 2
    finally:
        pipeline.shutdown()


@both_databases
def test_enhanced_ct_input_gives_single_frame_derived_series(env, tmp_path):
    from tests.support.enhanced import write_enhanced_ct

    config, sessions, pipeline, files, _ = env
    src = tmp_path / "enhanced.dcm"
    enhanced = write_enhanced_ct(files, src)
    spool = Path(config.storage.spool_dir)
    rel = Path("1.2") / "3.4" / "enhanced.dcm"
    (spool / rel).parent.mkdir(parents=True)
    shutil.copyfile(src, spool / rel)
    with sessions() as s:
        study = Study(study_uid=enhanced.StudyInstanceUID)
        series = Series(series_uid=enhanced.SeriesInstanceUID, study=study, modality="CT")
        s.add(
            Instance(
                series=series,
                sop_class_uid=enhanced.SOPClassUID,
                sop_instance_uid=enhanced.SOPInstanceUID,
                number_of_frames=5,
                transfer_syntax_uid=enhanced.file_meta.TransferSyntaxUID,
                file_path=str(rel),
                file_size=1,
                sha256="0" * 64,
            )
        )
        series.last_received = utcnow() - timedelta(seconds=5)
        s.commit()
    pipeline.check_completion()
    job = _run_next(pipeline, sessions)
    derived = derived_dir_path(job, config.storage.spool_root)
    out = [pydicom.dcmread(p) for p in sorted(derived.glob("*.dcm"))]
    assert len(out) == 9 and all(int(ds.get("NumberOfFrames", 1)) == 1 for ds in out)
    refs = {(r.ReferencedSOPInstanceUID, int(r.ReferencedFrameNumber)) for ds in out
            for r in ds.SourceImageSequence}  # fmt: skip
    assert {uid for uid, _ in refs} == {enhanced.SOPInstanceUID}
    assert {frame for _, frame in refs} == {1, 2, 3, 4, 5}
    (ser,) = out[0].ReferencedSeriesSequence
    assert [r.ReferencedSOPInstanceUID for r in ser.ReferencedInstanceSequence] == [
        enhanced.SOPInstanceUID
    ]
    import subprocess

    proc = subprocess.run(["/usr/bin/dciodvfy", out[4].filename], capture_output=True, text=True)
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]
    assert errors == []


@both_databases
def test_unloadable_model_leaves_series_waiting_with_reason(env):
    config, sessions, _, files, _ = env

    def broken_loader(_model):
        raise ValueError("checkpoint holds another model config")

    pipeline = Pipeline(config, sessions, models=ModelPool(config.model, loader=broken_loader))
    series_id = _index(sessions, config, files)
    pipeline.check_completion()
    pipeline.check_completion()  # a second check neither crashes nor repeats the audit event
    with sessions() as s:
        series = s.get(Series, series_id)
        # Not rejected (the series is fine): it keeps its waiting state and is checked again.
        assert series.state in (SeriesState.receiving, SeriesState.changed)
        assert "model unavailable" in series.state_reason
        assert "another model config" in series.state_reason
        assert s.scalars(select(Job)).all() == []
        events = s.scalars(
            select(db.AuditEvent).where(db.AuditEvent.kind == "model_unavailable")
        ).all()
        assert len(events) == 1

    # Once the model loads, the same series is processed normally.
    fixed = Pipeline(
        config, sessions, models=ModelPool(config.model, loader=lambda _m: (LinearStandIn(), None))
    )
    fixed.check_completion()
    with sessions() as s:
        assert s.get(Series, series_id).state is SeriesState.complete
        assert len(s.scalars(select(Job)).all()) == 1


def _copy_as_new_series(files: list[Path], out_dir: Path, seed: str) -> list[Path]:
    """The same slices as another study and series (new UIDs), for multi-series tests."""
    from pydicom.uid import generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[seed, "study"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed, "series"])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, str(ds.SOPInstanceUID)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        copies.append(out_dir / f.name)
        ds.save_as(copies[-1])
    return copies


class RendezvousStandIn(LinearStandIn):
    """Interpolates only once ``parties`` jobs are inside ``interpolate`` at the same time."""

    def __init__(self, barrier: threading.Barrier, timeout_s: float):
        self.barrier, self.timeout_s = barrier, timeout_s

    def interpolate(self, volume, factor, progress=None):
        self.barrier.wait(timeout=self.timeout_s)  # BrokenBarrierError fails the job
        return super().interpolate(volume, factor, progress)


@pytest.mark.parametrize("concurrency", [2, 1])
@both_databases
def test_model_concurrency_runs_jobs_side_by_side(env, tmp_path, concurrency):
    """With ``model.concurrency: 2`` two series are interpolated at the same time (each job
    waits inside the model for the other); with 1 they cannot meet, and both jobs fail."""
    config, sessions, _, files, _ = env
    config = config.model_copy(
        update={"model": config.model.model_copy(update={"concurrency": concurrency})}
    )
    barrier = threading.Barrier(2)
    timeout_s = 30.0 if concurrency == 2 else 2.0
    models = ModelPool(
        config.model,
        size=concurrency,
        loader=lambda _m: (RendezvousStandIn(barrier, timeout_s), None),
    )
    pipeline = Pipeline(config, sessions, models=models, send_base_delay_s=0.01)
    _index(sessions, config, files)
    _index(sessions, config, _copy_as_new_series(files, tmp_path / "second", "concurrency"))
    pipeline.check_completion()
    with sessions() as s:
        assert len(s.scalars(select(Job)).all()) == 2
    pipeline.start()
    try:
        finished = (JobState.written, JobState.sent, JobState.failed)
        for _ in range(400):
            with sessions() as s:
                jobs = s.scalars(select(Job)).all()
                states = [j.state for j in jobs]
                reasons = [j.reason or "" for j in jobs]
            if all(st in finished for st in states):
                break
            threading.Event().wait(0.1)
    finally:
        pipeline.shutdown()
    assert models._created == concurrency  # one loaded model per concurrent job, kept
    if concurrency == 2:
        assert all(st in (JobState.written, JobState.sent) for st in states), states
    else:
        assert states == [JobState.failed, JobState.failed], states
        assert all("BrokenBarrierError" in r for r in reasons), reasons


@both_databases
def test_retention_removes_only_finished_files_and_reprocess_says_why(env, tmp_path):
    config, sessions, pipeline, files, port = env
    later = utcnow() + timedelta(days=8)
    assert pipeline.clean_up(now=later) == 0  # retention_days 0: clean-up is off

    config = config.model_copy(
        update={"storage": config.storage.model_copy(update={"retention_days": 7})}
    )
    models = ModelPool(config.model, loader=lambda _m: (LinearStandIn(), None))
    pipeline = Pipeline(config, sessions, models=models, send_base_delay_s=0.01)
    spool = Path(config.storage.spool_dir)

    def source_files(series_id: int) -> list[Path]:
        with sessions() as s:
            rows = s.scalars(select(Instance).where(Instance.series_id == series_id))
            return [spool / r.file_path for r in rows]

    done_id = _index(sessions, config, files)
    pipeline.check_completion()
    job = _run_next(pipeline, sessions)
    still_receiving_id = _index(
        sessions, config, _copy_as_new_series(files, tmp_path / "open", "retention")
    )
    derived = sorted(derived_dir_path(job, config.storage.spool_root).iterdir())
    assert derived and all(p.exists() for p in source_files(done_id))

    assert pipeline.clean_up(now=later) == 0  # the job is written but not yet sent: kept
    scp = SCP(port)
    try:
        assert _send(pipeline, job.id) is JobState.sent
    finally:
        scp.stop()
    assert pipeline.clean_up() == 0  # sent, but younger than 7 days

    assert pipeline.clean_up(now=later) == len(files) + len(derived)
    assert not any(p.exists() for p in source_files(done_id))
    assert not derived_dir_path(job, config.storage.spool_root).exists()
    assert all(p.exists() for p in source_files(still_receiving_id))  # not finished: kept
    with sessions() as s:
        kinds = s.scalars(select(db.AuditEvent.kind)).all()
        assert "retention_cleanup" in kinds
        # Reprocessing after clean-up is refused with the reason, not a crash.
        outcome = plan_and_queue(s, config, s.get(Series, done_id), models)
        assert outcome.state is SeriesState.rejected
        assert "no longer retained" in outcome.reason


def test_default_concurrency_is_one_job_per_gpu_each_on_its_own_gpu():
    from dicom_node.config import ModelSection
    from dicom_node.infer import cuda_device_count, device_for_slot, resolve_concurrency

    auto = ModelSection()
    assert auto.concurrency is None
    assert resolve_concurrency(auto, n_gpus=0) == 1  # CPU: one job
    assert resolve_concurrency(auto, n_gpus=4) == 4  # one per GPU
    assert resolve_concurrency(ModelSection(concurrency=2), n_gpus=4) == 2  # configured wins
    # This machine, for real: its GPUs (none on a CPU-only box) decide the default.
    assert resolve_concurrency(auto) == max(1, cuda_device_count("auto"))
    assert resolve_concurrency(ModelSection(device="cpu")) == 1
    assert [device_for_slot("auto", s, 2) for s in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert device_for_slot("cuda", 1, 1) == "cuda"
    assert device_for_slot("cpu", 1, 2) == "cpu"
    assert device_for_slot("auto", 0, 0) == "auto"


def test_model_pool_loads_each_slot_on_its_device():
    """With several GPUs the pool's models go to cuda:0, cuda:1, ...; the loader is told."""
    from dicom_node.config import ModelSection

    seen = []

    def loader(model):
        seen.append(model.device)
        return LinearStandIn(), None

    pool = ModelPool(ModelSection(device="cpu"), size=2, loader=loader)
    a, b = pool.acquire(), pool.acquire()
    pool.release(a)
    pool.release(b)
    assert seen == ["cpu", "cpu"] and pool.acquire() in (a, b)


def test_flip_ensemble_setting_reaches_the_model_and_its_version():
    """``model.flip_ensemble`` changes the pixels, so it must change the model version that
    derived UIDs and job keys are made from."""
    from dicom_node.config import ModelSection

    plain = ModelPool(ModelSection(device="cpu")).identity()
    ensemble = ModelPool(ModelSection(device="cpu", flip_ensemble=True)).identity()
    assert ensemble.model_id == plain.model_id
    assert ensemble.model_version == plain.model_version + "+flip4"
    assert parse_config({"model": {"flip_ensemble": True}}).model.flip_ensemble


def test_node_feeds_the_model_its_training_slice_order(sample_data):
    """The real 20-slice CT is numbered head-down; the node must give the shipped model the same
    ascending array that SimpleITK (``acvtt interpolate``/``acvtt eval``) reads, and return the
    result in the source's order."""
    from acvtt_core.infer import load_interpolator
    from acvtt_core.volume_io import read_volume
    from dicom_node.infer import interpolate_in_model_order
    from dicom_node.load import load_series
    from dicom_node.plan import SeriesPlan, plan_slices
    from dicom_node.slices import slice_refs_from_file

    files = sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm"))
    plan = plan_slices("1.2.3", [r for f in files for r in slice_refs_from_file(f)])
    assert isinstance(plan, SeriesPlan) and not plan.ascending_along_normal
    node_order = load_series(plan).volume[:, 160:352, 160:352]
    file_order = read_volume(sample_data.ct_dicom_repaired)[0][:, 160:352, 160:352]
    np.testing.assert_array_equal(node_order[::-1], file_order)

    interp = load_interpolator(device="cpu")
    got = interpolate_in_model_order(interp, node_order, 2, ascending=False)
    want = interp.interpolate(np.ascontiguousarray(file_order), 2)[::-1]
    np.testing.assert_allclose(got, want, atol=1e-3)
    # The model is not symmetric in z, so the order it is fed matters.
    as_numbered = interp.interpolate(np.ascontiguousarray(node_order), 2)
    assert float(np.abs(as_numbered - got).max()) > 1.0


@both_databases
def test_writer_repairs_are_noted_on_the_job(env, tmp_path):
    config, sessions, pipeline, files, _ = env
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientName = "X" * 5000  # far over PN's 64 characters
        ds.save_as(bad / f.name, enforce_file_format=True)
    _index(sessions, config, sorted(bad.iterdir()))
    pipeline.check_completion()
    job = _run_next(pipeline, sessions)
    notes = job.summary["writer_notes"]
    assert any("PatientName" in n for n in notes), notes
    assert not any("XXXX" in n for n in notes)  # names of attributes, never their values
