"""nodes table

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 05:30:00

* ``nodes``: one row per node process that shares the database (``node.id``), written by the
  node itself (dicom_node/nodes.py): registered at start, ``last_seen`` renewed every
  ``heartbeat_s``, ``stopped_at`` set at a clean stop. ``dicom-node status`` reads it to show
  the whole installation (alive, stale or stopped).
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=64), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("devices", sa.String(length=255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("heartbeat_s", sa.Float(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen", sa.DateTime(), nullable=False),
        sa.Column("stopped_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("nodes")
