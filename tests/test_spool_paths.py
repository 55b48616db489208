"""Paths the database keeps are relative to the spool root (issue 12, item 5).

Every node of an installation mounts the shared spool, not necessarily at the same path: the
database keeps ``jobs.derived_dir`` and ``jobs.preview_path`` relative to the spool (as it
keeps the source instances' paths), and each node joins them with its own
``storage.spool_dir``. The first tests check the two conversions on their own; the others run a
real job in-process (the pipeline of tests/test_pipeline.py, with its linear stand-in for the
model), then move the spool to another path, as another node would mount it, and deliver,
show, resend, preview and clean up the job from there.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from dicom_node import jobs, operations
from dicom_node.config import NodeConfig
from dicom_node.db import Job, JobState, utcnow
from dicom_node.deliver import deliver_job
from dicom_node.retention import clean_up
from dicom_node.spool import StoredPathError, from_stored, to_stored
from dicom_node.web.context import NodeView
from dicom_node.web.server import HttpServer
from tests.test_pipeline import SCP, _free_port, _index, _run_next, env  # noqa: F401

# -- the conversions ----------------------------------------------------------------------------


def test_paths_inside_the_spool_are_stored_relative(tmp_path):
    root = (tmp_path / "spool").resolve()
    (root / "derived" / "job-7").mkdir(parents=True)
    assert to_stored(root / "derived" / "job-7", root) == "derived/job-7"
    assert to_stored(str(root / "derived" / "job-7" / "preview.png"), root) == (
        "derived/job-7/preview.png"
    )
    # The same folder reached through a link to the spool is still inside it.
    (tmp_path / "link").symlink_to(root)
    assert to_stored(tmp_path / "link" / "derived" / "job-7", root) == "derived/job-7"
    assert from_stored("derived/job-7", root) == root / "derived" / "job-7"
    assert from_stored(to_stored(root / "derived" / "x.dcm", root), root) == root / "derived/x.dcm"


@pytest.mark.parametrize("outside", ["elsewhere/x", "spool-2/derived", "spool", "spool/../x"])
def test_a_path_outside_the_spool_is_not_stored(tmp_path, outside):
    root = (tmp_path / "spool").resolve()
    root.mkdir()
    with pytest.raises(StoredPathError):
        to_stored(tmp_path.resolve() / outside, root)


@pytest.mark.parametrize(
    "stored", ["..", "../x", "derived/../../x", "derived/job-1/../../../etc", ""]
)
def test_a_stored_path_that_leaves_the_spool_is_refused(tmp_path, stored):
    with pytest.raises(StoredPathError):
        from_stored(stored, tmp_path / "spool")


def test_an_absolute_stored_path_from_before_is_used_as_is(tmp_path):
    # Rows written before paths were kept relative hold absolute paths; they stay readable on
    # the node that wrote them.
    legacy = str(tmp_path / "spool" / "derived" / "job-1")
    assert from_stored(legacy, tmp_path / "other") == Path(legacy)


@pytest.mark.parametrize("name", ["../x.dcm", "a/b.dcm", "/etc/passwd", "..", ""])
def test_a_derived_file_name_that_is_not_a_plain_name_is_refused(tmp_path, name):
    job = Job(id=1, derived_dir="derived/job-1", derived_files=["ok.dcm", name])
    with pytest.raises(StoredPathError):
        jobs.derived_paths(job, tmp_path)
    assert "cannot be read" in (jobs.missing_derived(job, tmp_path) or "")


# -- one job, its spool mounted elsewhere --------------------------------------------------------


def _moved(config: NodeConfig, spool: Path, **storage) -> NodeConfig:
    """The configuration of a node that mounts the spool at ``spool``, with its HTTP side on."""
    return config.model_copy(
        update={
            "storage": config.storage.model_copy(update={"spool_dir": spool, **storage}),
            "http": config.http.model_copy(update={"enabled": True, "port": _free_port()}),
        }
    )


def _written_job(env) -> tuple[int, NodeConfig]:  # noqa: F811
    config, sessions, pipeline, files, _ = env
    _index(sessions, config, files)
    pipeline.check_completion()
    job = _run_next(pipeline, sessions)
    assert not Path(job.derived_dir).is_absolute() and not Path(job.preview_path).is_absolute()
    # The spool is now seen at another path: the folder the first node wrote to is gone.
    elsewhere = config.storage.spool_root.with_name("mounted-elsewhere")
    os.rename(config.storage.spool_root, elsewhere)
    return job.id, _moved(config, elsewhere)


def test_a_node_mounting_the_spool_elsewhere_delivers_shows_and_previews(env):  # noqa: F811
    _, sessions, _, _, port = env
    job_id, moved = _written_job(env)
    root = moved.storage.spool_root
    pacs = SCP(port)
    try:
        assert deliver_job(moved, sessions, job_id) is JobState.sent
        with sessions() as s:
            job = s.get(Job, job_id)
            names = list(job.derived_files)
            assert len(pacs.received) == len(names) > 0
            shown = operations.job_as_dict(job, root)
        assert Path(shown["derived_dir"]) == root / "derived" / f"job-{job_id}"
        assert sorted(p.name for p in Path(shown["derived_dir"]).glob("*.dcm")) == sorted(names)
        # resend finds the files under the new path too, and they go out again.
        with sessions() as s:
            operations.resend(s, moved, job_id, all_instances=True, by="test", via="cli")
        assert deliver_job(moved, sessions, job_id) is JobState.sent
        assert len(pacs.received) == 2 * len(names)
    finally:
        pacs.stop()
    view = NodeView(config=moved, sessions=sessions, started=datetime.now(UTC), runs_jobs=False)
    server = HttpServer(view)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        png = requests.get(f"{base}/api/jobs/{job_id}/preview.png", timeout=10)
        assert png.status_code == 200, png.text
        assert png.content == Path(shown["preview_path"]).read_bytes()
        assert (
            requests.get(f"{base}/api/jobs/{job_id}", timeout=10).json()["preview_path"]
            == (shown["preview_path"])
        )
    finally:
        server.stop()


def test_retention_removes_the_derived_series_under_the_nodes_own_spool(env):  # noqa: F811
    _, sessions, _, _, _ = env
    job_id, moved = _written_job(env)
    with sessions() as s:
        jobs.transition(s, s.get(Job, job_id), JobState.sent, None)
        s.commit()
    folder = moved.storage.spool_root / "derived" / f"job-{job_id}"
    n_files = len(list(folder.iterdir()))
    keeping = moved.model_copy(
        update={"storage": moved.storage.model_copy(update={"retention_days": 1})}
    )
    assert clean_up(keeping, sessions, now=utcnow() + timedelta(days=3)) >= n_files
    assert not folder.exists()


def test_stored_paths_that_leave_the_spool_are_not_followed(env, tmp_path):  # noqa: F811
    config, sessions, _, _, _ = env
    job_id, moved = _written_job(env)
    # Files outside the spool that a tampered or broken row points at: never sent, shown,
    # served or deleted.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.dcm").write_bytes(b"not for sending")
    (outside / "preview.png").write_bytes(b"not for showing")
    climb = os.path.relpath(outside, moved.storage.spool_root)
    with sessions() as s:
        job = s.get(Job, job_id)
        job.derived_dir, job.derived_files = climb, ["x.dcm"]
        job.preview_path = f"{climb}/preview.png"
        s.commit()
    view = NodeView(config=moved, sessions=sessions, started=datetime.now(UTC), runs_jobs=False)
    server = HttpServer(view)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert requests.get(f"{base}/api/jobs/{job_id}/preview.png", timeout=10).status_code == 404
        shown = requests.get(f"{base}/api/jobs/{job_id}", timeout=10).json()
        assert shown["derived_dir"] is None and shown["preview_path"] is None
    finally:
        server.stop()
    with sessions() as s, pytest.raises(operations.NotPossible, match="leaves the spool"):
        operations.resend(s, moved, job_id, by="test", via="cli")
    assert deliver_job(moved, sessions, job_id) is JobState.failed
    with sessions() as s:
        assert "leaves the spool" in s.get(Job, job_id).reason  # failed: retention's to clean
    keeping = moved.model_copy(
        update={"storage": moved.storage.model_copy(update={"retention_days": 1})}
    )
    clean_up(keeping, sessions, now=utcnow() + timedelta(days=3))
    assert (outside / "x.dcm").exists() and (outside / "preview.png").exists()
