"""The index database: studies, series, instances, jobs, the audit trail and the nodes that share
it (SQLAlchemy 2 ORM).

The schema is created and upgraded only by alembic (``dicom-node db upgrade``, or
:func:`upgrade` at start-up); :func:`make_engine` configures SQLite for concurrent writers
(WAL journal, busy timeout, synchronous=FULL so a committed row survives power loss).
A job's whole state lives here, so any stage can stop and restart without losing it.
"""

from __future__ import annotations

import contextlib
import enum
import json
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.sql import Executable

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class SeriesState(enum.StrEnum):
    receiving = "receiving"  # instances arriving, quiet period not over
    complete = "complete"  # quiet period over, geometry checked, job queued
    changed = "changed"  # an instance arrived or changed after the series was complete
    rejected = "rejected"  # geometry/rules refused it; reason in state_reason
    ignored = "ignored"  # no rule matched
    processed = "processed"  # a job for the current instance set was sent


class JobState(enum.StrEnum):
    queued = "queued"
    running = "running"
    written = "written"
    sent = "sent"
    failed = "failed"
    rejected = "rejected"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    first_received: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[SeriesState] = mapped_column(
        Enum(SeriesState, native_enum=False, length=16), default=SeriesState.receiving
    )
    state_reason: Mapped[str | None] = mapped_column(Text)
    first_received: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_received: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    # Incremented on every new or changed instance: completion compares it to detect late ones.
    revision: Mapped[int] = mapped_column(Integer, default=0)
    # Not complete before this time, whatever the quiet period says: set when an association
    # that stored into the series ended without a release, and at start-up for series that
    # were still arriving when the node stopped (a partial series must not look complete).
    hold_until: Mapped[datetime | None] = mapped_column(DateTime)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(
        back_populates="series", order_by="Instance.instance_number"
    )

    __table_args__ = (Index("ix_series_state", "state"),)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    acquisition_number: Mapped[int | None] = mapped_column(Integer)
    image_position: Mapped[list[float] | None] = mapped_column(JSON)
    image_orientation: Mapped[list[float] | None] = mapped_column(JSON)
    pixel_spacing: Mapped[list[float] | None] = mapped_column(JSON)
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    frame_of_reference_uid: Mapped[str | None] = mapped_column(String(64))
    image_type: Mapped[list[str] | None] = mapped_column(JSON)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    images_in_acquisition: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(Text)
    file_size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One ACVTT run over one exact instance set of a source series."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    source_series_uid: Mapped[str] = mapped_column(String(64))
    instances_hash: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    factor: Mapped[int] = mapped_column(Integer)
    rule_name: Mapped[str | None] = mapped_column(String(128))
    destinations: Mapped[list[str]] = mapped_column(JSON, default=list)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16), default=JobState.queued, index=True
    )
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    send_attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_send_at: Mapped[datetime | None] = mapped_column(DateTime)
    derived_series_uid: Mapped[str | None] = mapped_column(String(64))
    derived_dir: Mapped[str | None] = mapped_column(Text)
    preview_path: Mapped[str | None] = mapped_column(Text)
    supersedes_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    stage_seconds: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    # The typed hand-offs between stages: what the job reads (the exact source instances,
    # written by completion) and what it wrote (file names inside ``derived_dir``, read by
    # delivery). ``summary`` is for display only.
    source_sop_uids: Mapped[list[str]] = mapped_column(JSON, default=list)
    derived_files: Mapped[list[str]] = mapped_column(JSON, default=list)
    # When the current run of transient send failures began (None while sends succeed): the
    # retry budget counts time, not attempts.
    send_failing_since: Mapped[datetime | None] = mapped_column(DateTime)
    # Set while a send attempt runs: still set at the next attempt means that one was cut off
    # (a crash), so the destination is asked what it already holds before anything is resent.
    send_started_at: Mapped[datetime | None] = mapped_column(DateTime)
    # The claim (jobs.claim_next, jobs.claim_send): the node that holds the job to run or send
    # it, until the lease expires; the holder's heartbeat renews it. Several nodes share one
    # database, so a job is taken over only once its lease has run out (jobs.reap_expired).
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    summary: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    series: Mapped[Series] = relationship()
    sent: Mapped[list[SentInstance]] = relationship(back_populates="job")

    __table_args__ = (
        UniqueConstraint(
            "source_series_uid",
            "instances_hash",
            "model_id",
            "model_version",
            "factor",
            name="uq_job_key",
        ),
    )


class SentInstance(Base):
    """An instance of a job's derived series that a destination acknowledged (0x0000/0xBxxx)."""

    __tablename__ = "sent_instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    sent_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="sent")

    __table_args__ = (
        UniqueConstraint("job_id", "destination", "sop_instance_uid", name="uq_sent"),
    )


class AuditEvent(Base):
    """Something an administrator may need to explain later. Never holds patient data."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(48), index=True)
    series_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)


class NodeRow(Base):
    """A node process sharing this database, as it last reported itself (dicom_node/nodes.py).
    ``stopped_at`` is None while it runs; a ``last_seen`` older than three ``heartbeat_s`` of a
    node that never stopped means it crashed, hangs or is cut off from the database."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # node.id
    host: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    version: Mapped[str] = mapped_column(String(64))
    # What the node loaded: None until it loads a model (a receiver may never).
    model_id: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    devices: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    ae_title: Mapped[str] = mapped_column(String(16))
    port: Mapped[int | None] = mapped_column(Integer)  # None for a worker (no DICOM port)
    heartbeat_s: Mapped[float] = mapped_column(Float)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    last_seen: Mapped[datetime] = mapped_column(DateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime)


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - exercised via engine
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str, busy_timeout_ms: int = 30_000) -> Engine:
    """Create an engine. SQLite: WAL and a busy timeout. PostgreSQL: a row lock is waited for
    at most ``busy_timeout_ms`` (``lock_timeout``), a connection attempt at most 10 s, and a
    pooled connection is checked before use, so that the node carries on by itself after the
    database server restarted. No directory is created: a missing one is a configuration error
    (:func:`dicom_node.config.check_database_path`)."""
    kwargs: dict = {"future": True}
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        kwargs["connect_args"] = {
            "timeout": busy_timeout_ms / 1000,
            "check_same_thread": False,
        }
    elif backend == "postgresql":
        kwargs["pool_pre_ping"] = True
        kwargs["connect_args"] = {
            "connect_timeout": 10,
            # 0 would mean "wait forever" to PostgreSQL, never "do not wait".
            "options": f"-c lock_timeout={max(1, busy_timeout_ms)}",
        }
    engine = create_engine(url, **kwargs)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class DriverStatement:
    """A Core statement run on the database driver's own cursor, inside a SQLAlchemy
    connection's transaction: for the one or two statements per received instance, where
    SQLAlchemy's execution path (execution context, result object, parameter handling) cost
    about three times what SQLite itself spends on the row (docs/SCALING.md).

    The statement is compiled by SQLAlchemy for the engine's dialect, once per set of parameter
    names, and each value goes through the column type's own bind processor (JSON, dates,
    enums), so the driver gets what SQLAlchemy would have sent. A driver error is raised as
    SQLAlchemy's exception (OperationalError, IntegrityError, ...), and a lost server connection
    invalidates the pooled connection, as SQLAlchemy's own execution does. Returns the row
    count and the first row (a ``RETURNING`` statement's), the cursor closed. What it leaves
    out: SQLAlchemy's cursor-execution events (``before_cursor_execute`` and its kin) do not
    see these statements (the node listens to none), and a statement with a list expanded at
    execution time (``IN`` of a list) is refused.
    """

    def __init__(self, engine: Engine, statement: Executable):
        self.dialect = engine.dialect
        self.statement = statement
        self._compiled: dict[frozenset[str], tuple] = {}

    def _compile(self, names: frozenset[str]) -> tuple:
        compiled = self.statement.compile(dialect=self.dialect, column_keys=sorted(names))
        if compiled.escaped_bind_names:  # every name the node uses is a plain identifier
            raise ValueError(f"bind names need escaping: {compiled.escaped_bind_names}")
        if "POSTCOMPILE" in compiled.string:  # "IN (...)" of a list: not rendered once
            raise ValueError("statement has bind parameters expanded at execution time")
        processors = {}
        for bind, name in compiled.bind_names.items():
            proc = bind.type.dialect_impl(self.dialect).bind_processor(self.dialect)
            if proc is not None:
                processors[name] = proc
        order = compiled.positiontup if self.dialect.positional else None
        entry = self._compiled[names] = (compiled, processors, order)
        return entry

    def execute(self, conn: Connection, params: dict) -> tuple[int, tuple | None]:
        compiled, processors, order = self._compiled.get(frozenset(params)) or self._compile(
            frozenset(params)
        )
        values = compiled.construct_params(params)
        for name, proc in processors.items():
            values[name] = proc(values[name])
        args = [values[name] for name in order] if order is not None else values
        if not conn.in_transaction():
            conn.begin()  # what the first conn.execute() of a transaction does
        dbapi_conn = conn.connection.dbapi_connection
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(compiled.string, args)
            row = cursor.fetchone() if cursor.description is not None else None
            return cursor.rowcount, row
        except self.dialect.loaded_dbapi.Error as exc:
            disconnected = self.dialect.is_disconnect(exc, dbapi_conn, cursor)
            if disconnected:
                conn.invalidate()
            raise DBAPIError.instance(
                compiled.string,
                args,
                exc,
                self.dialect.loaded_dbapi.Error,
                connection_invalidated=disconnected,
                dialect=self.dialect,
            ) from exc
        finally:
            cursor.close()


def check_writable(engine: Engine) -> None:
    """Raise :class:`~sqlalchemy.exc.OperationalError` unless the database takes a write. The
    write (the schema version set to itself) is rolled back: nothing changes."""
    with engine.connect() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = version_num"))
        conn.rollback()


def unwritable_reason(exc: OperationalError) -> str | None:
    """One line when ``exc`` means this process cannot write the database (a matter of
    configuration: permissions, a read-only mount or URL); None for anything else."""
    first = str(exc.orig or exc).splitlines()[0][:200]
    low = first.lower()
    if any(s in low for s in ("readonly", "read-only", "read only", "permission denied")):
        return f"the database is read-only for this process: {first}"
    if "unable to open database file" in low:
        return f"cannot open the database file: {first} (check it and its directory)"
    if "connection" in low and any(s in low for s in ("refused", "failed", "timeout", "timed")):
        return f"cannot reach the database server: {first}"
    return None


@contextlib.contextmanager
def one_node_at_a_time(engine: Engine, task: str) -> Iterator[bool]:
    """Whether this process may run ``task`` now (completion checks, clean-up), for the length
    of the block. On PostgreSQL, where several nodes share the database, a session advisory
    lock named after ``task`` is tried on a connection of its own: one node gets True and the
    others False (they skip this pass; it runs again soon). A node that dies loses the lock with
    its connection. SQLite (one machine): always True."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    key = zlib.crc32(f"dicom-node:{task}".encode())
    with engine.connect() as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        conn.commit()  # the lock belongs to the session: no transaction stays open meanwhile
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str):
    # alembic is imported here and in upgrade(): it takes about 0.35 s to load, and only schema
    # upgrades (serve's start, `db upgrade`) need it, not every CLI command.
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (idempotent)."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")


def fit_audit_fields(fields: dict[str, object]) -> dict[str, object]:
    """``fields`` with every string cut to its audit column's length: SQLite keeps a longer one,
    PostgreSQL refuses the whole row, and an audit row must never fail over a peer's long
    address or a malformed UID."""
    out = dict(fields)
    for name, value in fields.items():
        column = AuditEvent.__table__.columns.get(name)
        length = getattr(column.type, "length", None) if column is not None else None
        if isinstance(value, str) and length is not None and len(value) > length:
            out[name] = value[:length]
    return out


def audit(session: Session, kind: str, **fields: object) -> AuditEvent:
    """Add an audit event to ``session`` (the caller commits). ``detail`` dicts become JSON."""
    detail = fields.pop("detail", None)
    if detail is not None and not isinstance(detail, str):
        detail = json.dumps(detail, default=str)
    ev = AuditEvent(**fit_audit_fields({"kind": kind, "detail": detail, **fields}))
    session.add(ev)
    return ev
