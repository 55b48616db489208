"""series hold; job hand-offs as columns; send failure clock

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 03:00:00

* ``series.hold_until``: an aborted association or a restart holds a series back from
  completion (a partial series must not look complete).
* ``jobs.source_sop_uids`` and ``jobs.derived_files``: the stage hand-offs that used to live in
  ``jobs.summary``; existing rows are copied over.
* ``jobs.send_failing_since``: the retry budget counts time since the first transient failure.
* ``jobs.send_started_at``: set while a send attempt runs (a crash leaves it set).
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hold_until", sa.DateTime(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("source_sop_uids", sa.JSON(), nullable=False, server_default="[]")
        )
        batch_op.add_column(
            sa.Column("derived_files", sa.JSON(), nullable=False, server_default="[]")
        )
        batch_op.add_column(sa.Column("send_failing_since", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("send_started_at", sa.DateTime(), nullable=True))

    # Move the hand-offs out of the display summary.
    conn = op.get_bind()
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.Integer),
        sa.column("summary", sa.JSON),
        sa.column("source_sop_uids", sa.JSON),
        sa.column("derived_files", sa.JSON),
    )
    for job_id, summary in conn.execute(sa.select(jobs.c.id, jobs.c.summary)).all():
        if isinstance(summary, str):
            summary = json.loads(summary)
        summary = dict(summary or {})
        sources = summary.pop("source_sop_uids", None) or []
        derived = summary.pop("derived_files", None) or []
        conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(summary=summary, source_sop_uids=sources, derived_files=derived)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("send_started_at")
        batch_op.drop_column("send_failing_since")
        batch_op.drop_column("derived_files")
        batch_op.drop_column("source_sop_uids")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("hold_until")
