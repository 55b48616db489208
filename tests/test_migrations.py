"""Alembic migrations on both engines: SQLite and PostgreSQL reach the same schema as the
models, 0002 moves the job hand-offs out of ``summary`` on existing rows, and every migration
can be undone."""

from __future__ import annotations

from datetime import datetime

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from dicom_node import db
from tests.support.postgres import DATABASE_KINDS


@pytest.fixture(params=DATABASE_KINDS)
def db_kind(request) -> str:
    return request.param


def test_head_schema_matches_the_models(database_url):
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), db.Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_0002_moves_handoffs_out_of_summary_on_existing_rows(database_url):
    cfg = db.alembic_config(database_url)
    command.upgrade(cfg, "0001")
    engine = db.make_engine(database_url)
    now = datetime(2026, 12, 1, 12, 0, 0)
    summary = {"rule": "thick", "source_sop_uids": ["1.2.1", "1.2.2"], "derived_files": ["a.dcm"]}
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO studies (id, study_uid, first_received) VALUES (1, '1.2', :t)"
                ),
                {"t": now},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO series (id, series_uid, study_id, state, first_received,"
                    " last_received, revision) VALUES (1, '1.2.3', 1, 'complete', :t, :t, 1)"
                ),
                {"t": now},
            )
            jobs = sa.table(
                "jobs",
                *(
                    sa.column(c, t)
                    for c, t in [
                        ("id", sa.Integer),
                        ("series_id", sa.Integer),
                        ("source_series_uid", sa.String),
                        ("instances_hash", sa.String),
                        ("model_id", sa.String),
                        ("model_version", sa.String),
                        ("factor", sa.Integer),
                        ("destinations", sa.JSON),
                        ("priority", sa.Integer),
                        ("state", sa.String),
                        ("attempts", sa.Integer),
                        ("send_attempts", sa.Integer),
                        ("stage_seconds", sa.JSON),
                        ("summary", sa.JSON),
                        ("created_at", sa.DateTime),
                        ("updated_at", sa.DateTime),
                    ]
                ),
            )
            conn.execute(
                jobs.insert().values(
                    id=1,
                    series_id=1,
                    source_series_uid="1.2.3",
                    instances_hash="h" * 64,
                    model_id="m",
                    model_version="1",
                    factor=2,
                    destinations=["pacs"],
                    priority=0,
                    state="written",
                    attempts=1,
                    send_attempts=0,
                    stage_seconds={},
                    summary=summary,
                    created_at=now,
                    updated_at=now,
                )
            )
        db.upgrade(database_url)
        with db.make_session_factory(engine)() as s:
            job = s.get(db.Job, 1)
            assert job.source_sop_uids == ["1.2.1", "1.2.2"]
            assert job.derived_files == ["a.dcm"]
            assert job.summary == {"rule": "thick"}
            assert job.destinations == ["pacs"]
    finally:
        engine.dispose()


def test_every_migration_can_be_undone_and_redone(database_url):
    cfg = db.alembic_config(database_url)
    db.upgrade(database_url)
    command.downgrade(cfg, "base")
    engine = db.make_engine(database_url)
    try:
        tables = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
        assert tables == set()
    finally:
        engine.dispose()
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    try:
        tables = set(sa.inspect(engine).get_table_names())
        assert {"jobs", "series", "instances", "audit_events"} <= tables
    finally:
        engine.dispose()
