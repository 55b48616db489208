"""Alembic environment: runs migrations against the URL that dicom_node.db passes in."""

import zlib

from alembic import context
from sqlalchemy import text

from dicom_node.db import Base, make_engine

config = context.config
target_metadata = Base.metadata
_UPGRADE_LOCK = zlib.crc32(b"dicom-node:schema-upgrade")


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Nodes sharing the database upgrade it as they start; several at once on a
                # new one collided on the tables each created. They take turns (the lock ends
                # with this transaction), and the later ones find the schema current.
                connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _UPGRADE_LOCK})
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
