"""Retention: remove source and derived files older than ``storage.retention_days``.

Only files of finished work go: a series still arriving or with a job queued, running or waiting
to be sent keeps its files. Index, job and audit rows stay (history). ``retention_days: 0``
keeps everything.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.db import Instance, Job, JobState, Series, SeriesState, audit, utcnow
from dicom_node.jobs import derived_dir_path
from dicom_node.spool import StoredPathError

__all__ = ["clean_up"]

log = logging.getLogger(__name__)

_BUSY = (JobState.queued, JobState.running, JobState.written)


def clean_up(
    config: NodeConfig, sessions: sessionmaker[Session], now: datetime | None = None
) -> int:
    """Remove files older than the retention period whose work is finished; returns how many
    files were removed."""
    days = config.storage.retention_days
    if days <= 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=days)
    with sessions() as s:
        removed = _remove_sources(s, config.storage.spool_root, cutoff)
        removed += _remove_derived(s, config.storage.spool_root, cutoff)
        if removed:
            audit(s, "retention_cleanup", detail={"files": removed, "cutoff": cutoff})
            s.commit()
    if removed:
        log.info("retention clean-up removed %d files", removed)
    return removed


def _remove_sources(s: Session, spool_root: Path, cutoff: datetime) -> int:
    removed = 0
    for ser in s.scalars(select(Series).where(Series.last_received < cutoff)).all():
        active = s.scalars(
            select(Job.id).where(Job.series_id == ser.id, Job.state.in_(_BUSY))
        ).first()
        if active is not None or ser.state in (SeriesState.receiving, SeriesState.changed):
            continue
        for inst in s.scalars(select(Instance).where(Instance.series_id == ser.id)):
            p = spool_root / inst.file_path
            if p.exists():
                p.unlink()
                removed += 1
    return removed


def _remove_derived(s: Session, spool_root: Path, cutoff: datetime) -> int:
    removed = 0
    for job in s.scalars(select(Job).where(Job.updated_at < cutoff, Job.state.not_in(_BUSY))).all():
        try:
            folder = derived_dir_path(job, spool_root)
        except StoredPathError as exc:
            # Never delete outside the spool, whatever the database says.
            log.warning("retention skips job_id=%s: %s", job.id, exc)
            continue
        if folder is not None and folder.exists():
            removed += sum(1 for _ in folder.iterdir())
            shutil.rmtree(folder, ignore_errors=True)
    return removed
