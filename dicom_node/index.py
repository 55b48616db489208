"""The instance index: record what the header reader (header.py) found, one row an instance.

:class:`Indexer` turns a stored file's :class:`~dicom_node.header.Header` into
Study/Series/Instance rows and keeps the audit trail of duplicates, replacements and rejections.
:meth:`Indexer.record` returns only once the transaction holding its row is committed; rows
stored at once by several associations share one transaction (:meth:`Indexer._grouped`).

Series bookkeeping promised to later stages: every new or changed instance increments
``Series.revision`` and sets ``last_received``; an instance that arrives or changes after the
series left ``receiving`` (complete, processed, rejected, ignored) sets its state to ``changed``.
An identical resend (same SOP Instance UID and SHA-256) changes nothing but an audit row. The
same SOP Instance UID in another series is refused (:class:`UidConflict`): an indexed instance
never moves to another series. Refusals of instances of a known series are audited so that
completion can read them back (:func:`refusals_for_series`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Connection, Engine, bindparam, case, insert, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from dicom_node.db import (
    AuditEvent,
    DriverStatement,
    Instance,
    Series,
    SeriesState,
    Study,
    fit_audit_fields,
    utcnow,
)
from dicom_node.header import STATUS_SUCCESS, STATUS_UID_CONFLICT, Header
from dicom_node.slices import as_int, instance_label

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class UidConflict(Exception):
    """Raised by :meth:`Indexer.record`: the SOP Instance UID is already indexed in another
    series. Nothing was recorded; the instance already indexed stays as it is."""

    status = STATUS_UID_CONFLICT
    reason = "SOP Instance UID already in another series"  # fits ErrorComment (LO, 64)

    def __init__(self, header: Header, other_series_uid: str, other_instance_number: int | None):
        super().__init__(self.reason)
        self.header = header
        self.other_series_uid = other_series_uid
        self.other_instance_number = other_instance_number


# -- recording ---------------------------------------------------------------------------------


_INSERT_STUDY = insert(Study)
_INSERT_SERIES = insert(Series)
_INSERT_AUDIT = insert(AuditEvent)
_SELECT_STUDY = select(Study.id).where(Study.study_uid == bindparam("uid"))
_SELECT_SERIES = select(Series.id).where(Series.series_uid == bindparam("uid"))
_SELECT_INSTANCE = select(Instance.id, Instance.sha256, Instance.series_id).where(
    Instance.sop_instance_uid == bindparam("uid")
)
_SELECT_OWNER = (
    select(Series.series_uid, Instance.instance_number)
    .join(Series, Series.id == Instance.series_id)
    .where(Instance.id == bindparam("instance_id"))
)
_UPDATE_INSTANCE = update(Instance).where(Instance.id == bindparam("instance_id"))
_OPEN_STATES = (SeriesState.receiving.value, SeriesState.changed.value)
# Every new or changed instance: revision + 1, last_received = now, and a series that had left
# "receiving" becomes "changed". A hold set by an aborted association or a restart ends: the
# sender is back, and the quiet period (and a new hold, should this association abort) decides.
_TOUCH_SERIES = (
    update(Series)
    .where(Series.id == bindparam("series_id"))
    .values(
        revision=Series.revision + 1,
        last_received=bindparam("now"),
        hold_until=None,
        # one comparison per state rather than IN (...), which is expanded at execution time:
        # DriverStatement compiles the statement once
        state=case(
            (or_(*(Series.state == state for state in _OPEN_STATES)), Series.state),
            else_=literal(SeriesState.changed.value),
        ),
    )
)


class _StaleCache(Exception):
    """Internal: retry the transaction without the cached series id."""


@dataclass
class _QueuedRow:
    """One :meth:`Indexer.record` waiting for a transaction (see :meth:`Indexer._grouped`)."""

    tx: Callable[[Connection], str]
    done: threading.Event = field(default_factory=threading.Event)
    result: str | None = None
    error: BaseException | None = None


class Indexer:
    """Records instances and rejections; every public method commits its own transaction.

    This runs once per received instance, inside the acknowledgement's latency, so it uses
    pre-built Core statements on a plain connection rather than ORM objects. Writes from the
    receiver's threads are serialised by a lock (SQLite has one writer anyway, and waiting on a
    lock is cheaper than SQLite's busy-sleep); a transient "database is locked" from another
    process, or a unique-key race, is retried.

    ``time_budget_s`` bounds each write: waiting for the lock, the database's own wait
    (SQLite's busy timeout or PostgreSQL's statement timeout, set to what is left) and the
    retries together. The receiver sets it, because a
    peer waits for the answer: a database held by another process then gives a prompt failure
    (0xA700) instead of a sender that times out. After a write ran out of time, an audit event
    gets one attempt without waiting, so that a failed store does not wait twice.
    """

    RETRIES = 5

    def __init__(self, session_factory: Callable[[], Session], time_budget_s: float | None = None):
        bind = getattr(session_factory, "kw", {}).get("bind")
        if bind is None:
            with session_factory() as s:
                bind = s.get_bind()
        self.engine: Engine = bind
        self.time_budget_s = time_budget_s
        self._lock = threading.Lock()
        # Group commit of instance rows (see _grouped): rows queued, and one committer at a time.
        self._queued: list[_QueuedRow] = []
        self._queue_lock = threading.Lock()
        self._committer = threading.Lock()
        self._series_ids: dict[str, int] = {}  # series UID -> row id, filled on commit
        self._out_of_time_at = -1e9  # monotonic time a write last ran out of its budget
        # INSERT ... ON CONFLICT (sop_instance_uid) DO NOTHING, in the engine's dialect. On
        # PostgreSQL it returns the new row's id (its row count is not the rows inserted
        # there), on SQLite the row count says whether it inserted. It and the series update
        # run once per received instance, on the driver's cursor (DriverStatement).
        if self.engine.dialect.name == "postgresql":
            insert_new = (
                postgresql_insert(Instance)
                .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
                .returning(Instance.id)
            )
        else:
            insert_new = sqlite_insert(Instance).on_conflict_do_nothing(
                index_elements=["sop_instance_uid"]
            )
        self._insert_new_instance = DriverStatement(self.engine, insert_new)
        self._returns_id = self.engine.dialect.name == "postgresql"
        self._touch_series = DriverStatement(self.engine, _TOUCH_SERIES)

    def _retrying(self, fn: Callable[[Connection], _T], budget_s: float | None = None) -> _T:
        budget_s = self.time_budget_s if budget_s is None else budget_s
        deadline = None if budget_s is None else time.monotonic() + budget_s
        delay = 0.01
        for attempt in range(self.RETRIES):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._lock.acquire(timeout=-1 if left is None else left):
                self._out_of_time_at = time.monotonic()
                raise OperationalError("index write", None, TimeoutError("index writes queued"))
            try:
                with self.engine.connect() as conn:
                    try:
                        if deadline is not None:
                            self._bound_wait(conn, deadline)
                        result = fn(conn)
                        conn.commit()
                        return result
                    except Exception as exc:
                        conn.rollback()
                        self._series_ids.clear()  # may hold ids from the failed transaction
                        retryable = isinstance(exc, IntegrityError | OperationalError | _StaleCache)
                        late = deadline is not None and time.monotonic() + delay >= deadline
                        if late and isinstance(exc, OperationalError):
                            self._out_of_time_at = time.monotonic()
                        if not retryable or attempt == self.RETRIES - 1 or late:
                            raise
                        log.warning("index write retry %d: %s", attempt + 1, type(exc).__name__)
            finally:
                self._lock.release()
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _bound_wait(self, conn: Connection, deadline: float) -> None:
        """Let this transaction wait for the database at most until ``deadline``: SQLite's
        busy timeout, PostgreSQL's statement timeout (for this transaction only)."""
        ms = max(0, int((deadline - time.monotonic()) * 1000))
        if self.engine.dialect.name == "sqlite":
            # A connection's busy timeout stays set: set it again only when it would run past
            # the deadline or is more than 50 ms shorter (one statement less per store).
            info = conn.connection.info
            if not ms - 50 <= info.get("busy_timeout_ms", -1) <= ms:
                conn.exec_driver_sql(f"PRAGMA busy_timeout = {ms}")
                info["busy_timeout_ms"] = ms
        elif self.engine.dialect.name == "postgresql":
            # 0 would mean "no limit" to PostgreSQL.
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, ms)}")

    def _series_id(self, conn: Connection, h: Header, calling_ae: str | None, now) -> int:
        """The series row id, creating study and series rows on first sight."""
        sid = self._series_ids.get(h.series_uid)
        if sid is not None:
            return sid
        sid = conn.execute(_SELECT_SERIES, {"uid": h.series_uid}).scalar()
        if sid is None:
            study_id = conn.execute(_SELECT_STUDY, {"uid": h.study_uid}).scalar()
            if study_id is None:
                study_id = conn.execute(
                    _INSERT_STUDY, {"study_uid": h.study_uid, "first_received": now}
                ).inserted_primary_key[0]
            sid = conn.execute(
                _INSERT_SERIES,
                {
                    "series_uid": h.series_uid,
                    "study_id": study_id,
                    "modality": h.modality,
                    "series_number": h.series_number,
                    "series_description": h.series_description,
                    "body_part": h.body_part,
                    "calling_ae": calling_ae,
                    "state": SeriesState.receiving,
                    "first_received": now,
                    "last_received": now,
                    "revision": 0,
                },
            ).inserted_primary_key[0]
        return sid

    def record(
        self,
        h: Header,
        file_path: str,
        file_size: int,
        sha256: str,
        calling_ae: str | None,
        peer: str | None = None,
    ) -> str:
        """Index a stored instance. Returns ``"new"``, ``"replaced"`` or ``"duplicate"``.

        ``"duplicate"`` (same SOP Instance UID and SHA-256 as indexed) changes nothing but an
        audit row; ``"replaced"`` (same SOP Instance UID and series, other content) updates the
        row and counts as a change of its series. Raises :class:`UidConflict`, recording
        nothing, when the SOP Instance UID is indexed in another series.
        """

        def tx(conn: Connection) -> str:
            now = utcnow()
            series_id = self._series_id(conn, h, calling_ae, now)
            values = {
                "series_id": series_id,
                **h.plane.row_values(),
                "number_of_frames": h.number_of_frames,
                "transfer_syntax_uid": h.transfer_syntax_uid,
                "file_path": file_path,
                "file_size": file_size,
                "sha256": sha256,
                "calling_ae": calling_ae,
                "received_at": now,
            }
            event = {
                "series_uid": h.series_uid,
                "sop_instance_uid": h.sop_instance_uid,
                "calling_ae": calling_ae,
                "peer": peer,
                "status": STATUS_SUCCESS,
            }
            # The usual case, an instance not indexed yet, is one statement: the insert does
            # nothing when the SOP Instance UID is indexed already, and then that row decides.
            count, returned = self._insert_new_instance.execute(
                conn, {"sop_instance_uid": h.sop_instance_uid, **values}
            )
            inserted = returned is not None if self._returns_id else count == 1
            if not inserted:
                prev = conn.execute(_SELECT_INSTANCE, {"uid": h.sop_instance_uid}).first()
                if prev is None:  # removed since the insert found it: run the row again
                    raise _StaleCache()
                if prev.series_id != series_id:
                    # The same SOP instance in another series is a sender error or a UID
                    # collision. Moving the row would silently take an acknowledged slice from
                    # its series, so the newcomer is refused and the indexed one stays (the
                    # caller audits both).
                    owner = conn.execute(_SELECT_OWNER, {"instance_id": prev.id}).one()
                    raise UidConflict(h, owner.series_uid, owner.instance_number)
                if prev.sha256 == sha256:
                    _audit(conn, "duplicate", now, **event)
                    return "duplicate"
                conn.execute(_UPDATE_INSTANCE, {"instance_id": prev.id, **values})
            if self._touch_series.execute(conn, {"series_id": series_id, "now": now})[0] != 1:
                raise _StaleCache()  # a cached series id vanished (series removed)
            self._series_ids[h.series_uid] = series_id
            if not inserted:
                _audit(conn, "replaced", now, **event)
                return "replaced"
            return "new"

        return self._grouped(tx)

    def _grouped(self, tx: Callable[[Connection], str]) -> str:
        """Run ``tx`` in a committed transaction, with the rows of other threads that wait at
        the same time: one commit (one WAL or PostgreSQL fsync) for all of them. Each caller
        returns only once its row is committed, or raises what its own row raised.

        With several associations storing at once, the commit's fsync was the step that the
        writes queued behind (measured with benchmarks/receive_cpu.py --threads 4: about 9 ms
        per row waiting at the index for a 2-4 ms commit). The thread that gets the committer
        lock takes every queued row; the others wait for it and find theirs done. Should one
        row fail (a UID conflict, say) the group's transaction is rolled back and each row runs
        again on its own, so that it fails only its own store; a database failure
        (OperationalError: locked, read-only, gone) fails the group, as it would each row.
        """
        row = _QueuedRow(tx)
        with self._queue_lock:
            self._queued.append(row)
        budget = self.time_budget_s
        started = time.monotonic()
        if not self._committer.acquire(timeout=-1 if budget is None else budget):
            with self._queue_lock:
                waiting = row in self._queued
                if waiting:
                    self._queued.remove(row)
            if waiting:
                self._out_of_time_at = time.monotonic()
                raise OperationalError("index write", None, TimeoutError("index writes queued"))
            row.done.wait()  # a committer has taken it: its outcome is the answer
        else:
            try:
                if not row.done.is_set():
                    with self._queue_lock:
                        group, self._queued = self._queued, []
                    left = None if budget is None else budget - (time.monotonic() - started)
                    self._commit_group(group, None if left is None else max(0.0, left))
            finally:
                self._committer.release()
        if row.error is not None:
            raise row.error
        return row.result  # type: ignore[return-value]

    def _commit_group(self, group: list[_QueuedRow], budget_s: float | None) -> None:
        """Commit ``group``'s rows, in one transaction where they all succeed, within
        ``budget_s`` (what the committing thread has left); set each row's outcome and wake
        its thread."""
        try:
            if len(group) > 1:
                try:
                    results = self._retrying(lambda conn: [r.tx(conn) for r in group], budget_s)
                except OperationalError as exc:  # the database failed, not one row
                    for r in group:
                        r.error = exc
                    return
                except Exception:  # one row's own failure: each on its own, below
                    log.debug("group of %d index rows failed; running them one by one", len(group))
                else:
                    for r, result in zip(group, results, strict=True):
                        r.result = result
                    return
            for r in group:
                try:
                    r.result = self._retrying(r.tx, budget_s)
                except Exception as exc:
                    r.error = exc
        finally:
            for r in group:
                r.done.set()

    def record_event(self, kind: str, **fields: object) -> None:
        """Audit a rejection, duplicate or failure; never raises (the caller is answering a
        peer, and the database may be what failed)."""
        budget = self.time_budget_s
        if budget is not None and time.monotonic() - self._out_of_time_at < budget:
            budget = 0.0  # the database just made a write wait its whole budget
        try:
            self._retrying(lambda conn: _audit(conn, kind, utcnow(), **fields) or kind, budget)
        except Exception as exc:
            log.error("cannot write audit event %s: %s", kind, type(exc).__name__)

    def record_refusal(
        self,
        status: int,
        reason: str,
        sop_instance_uid: str,
        calling_ae: str | None,
        peer: str | None,
        header: Header | None = None,
    ) -> None:
        """Audit an instance refused at receive (``instance_rejected``). With its ``header``, the
        event names its series and slice (a :data:`REFUSAL_KINDS` event that completion reads).
        Never raises."""
        self.record_event(
            "instance_rejected",
            series_uid=header.series_uid if header is not None else None,
            sop_instance_uid=sop_instance_uid[:64],
            calling_ae=calling_ae,
            peer=peer,
            status=status,
            detail=refusal_detail(header, reason) if header is not None else reason,
        )

    def record_uid_conflict(
        self, exc: UidConflict, calling_ae: str | None, peer: str | None = None
    ) -> None:
        """Audit a refused UID conflict on both series, in one transaction: the refused copy's
        series (a :data:`REFUSAL_KINDS` event that completion reads) and the series that keeps
        the indexed instance (so that ``series show`` of either tells). Never raises."""
        h = exc.header
        other = (
            f"instance #{exc.other_instance_number}"
            if exc.other_instance_number is not None
            else "an instance"
        )
        common = {
            "sop_instance_uid": h.sop_instance_uid,
            "calling_ae": calling_ae,
            "peer": peer,
            "status": exc.status,
        }
        refused = refusal_detail(
            h,
            f"its SOP Instance UID already belongs to {other} of series {exc.other_series_uid}",
            other_series_uid=exc.other_series_uid,
        )
        kept = {
            "reason": f"{other} of this series was sent again in series {h.series_uid}; that "
            f"copy was refused (0x{exc.status:04X}), this one is kept",
            "instance_number": exc.other_instance_number,
            "other_series_uid": h.series_uid,
        }

        def tx(conn: Connection) -> str:
            now = utcnow()
            _audit(conn, "uid_conflict_refused", now, series_uid=h.series_uid, detail=refused,
                   **common)  # fmt: skip
            _audit(conn, "uid_conflict_kept", now, series_uid=exc.other_series_uid, detail=kept,
                   **common)  # fmt: skip
            return "audited"

        try:
            self._retrying(tx)
        except Exception as err:
            log.error("cannot write audit events uid_conflict: %s", type(err).__name__)


# -- refusals ----------------------------------------------------------------------------------

# Audit kinds of an instance of a known series that the receiver refused: completion holds the
# series back while one is outstanding (see complete.outstanding_refusals).
REFUSAL_KINDS = ("uid_conflict_refused", "instance_rejected")


@dataclass(frozen=True)
class Refusal:
    """An instance the receiver refused, as its audit event records it (no patient data)."""

    sop_instance_uid: str
    instance_number: int | None
    position: tuple[float, ...] | None
    status: int | None
    reason: str
    at: datetime

    @property
    def label(self) -> str:
        """The slice as a person finds it: instance number (else UID tail) and position."""
        name = "instance " + instance_label(self.instance_number, self.sop_instance_uid)
        if self.position is not None:
            name += " at (" + ", ".join(f"{v:.1f}" for v in self.position) + ") mm"
        return name


def refusal_detail(h: Header, reason: str, **extra: object) -> dict[str, object]:
    """The audit detail of a refused instance, as :func:`refusals_for_series` reads it back."""
    return {
        "reason": reason,
        "instance_number": h.plane.instance_number,
        "position": list(h.plane.position) if h.plane.position is not None else None,
        **extra,
    }


def refusals_for_series(session: Session, series_uid: str) -> list[Refusal]:
    """Every refusal audited for ``series_uid``, oldest first."""
    events = session.scalars(
        select(AuditEvent)
        .where(AuditEvent.series_uid == series_uid, AuditEvent.kind.in_(REFUSAL_KINDS))
        .order_by(AuditEvent.at, AuditEvent.id)
    ).all()
    out = []
    for e in events:
        try:
            detail = json.loads(e.detail or "")
        except ValueError:
            detail = None
        if not isinstance(detail, dict):  # older events kept the reason as plain text
            detail = {"reason": e.detail or ""}
        position = detail.get("position")
        out.append(
            Refusal(
                sop_instance_uid=e.sop_instance_uid or "",
                instance_number=as_int(detail.get("instance_number")),
                position=tuple(position) if isinstance(position, list) else None,
                status=e.status,
                reason=str(detail.get("reason") or ""),
                at=e.at,
            )
        )
    return out


def _audit(conn: Connection, kind: str, now, **fields: object) -> None:
    detail = fields.pop("detail", None)
    if detail is not None and not isinstance(detail, str):
        detail = json.dumps(detail, default=str)
    conn.execute(
        _INSERT_AUDIT, fit_audit_fields({"kind": kind, "at": now, "detail": detail, **fields})
    )
