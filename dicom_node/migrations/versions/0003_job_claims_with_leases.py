"""job claims with leases

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 03:30:00

* ``jobs.claimed_by``: the node (``node.id``) that claimed the job last, to run it or to send it.
* ``jobs.lease_expires_at``: the claim holds until then; the holder's heartbeat renews it, and
  once it has passed any node may take the job over. NULL while nobody holds the job. Rows
  ``running`` from before this revision have none: the next node to start takes them back.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("claimed_by")
