"""Completion: when is a series finished, and what do the index and its files say of it?

Queries on the index database, and nothing else (the rules that judge a stack are plan.py's):

1. **Is the series quiet?** :func:`due_series` lists series in state ``receiving`` or
   ``changed`` whose last instance arrived at least ``quiet_seconds`` ago (the quiet period of the
   first rule that matches the series' metadata, else ``completion.quiet_seconds``), and whose
   hold (:func:`hold_series`, :func:`hold_unfinished_series`) is over.
2. **What is its plan?** :func:`plan_indexed_series` reads the slices of an indexed series (from
   its instance rows; multi-frame files for their frames) and plans them with the configured
   tolerances (:func:`dicom_node.plan.plan_slices`). A series with an outstanding refused
   instance (:func:`outstanding_refusals`) is rejected as a whole, naming the slice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, object_session

from dicom_node.config import NodeConfig
from dicom_node.db import Series, SeriesState, audit, utcnow
from dicom_node.index import Refusal, refusals_for_series
from dicom_node.plan import PlanResult, Rejection, Tolerances, plan_slices, tolerances_from_config
from dicom_node.rules import facts_from_series, metadata_matches, ordered_rules
from dicom_node.slices import SliceRef

__all__ = [
    "due_series",
    "hold_series",
    "hold_unfinished_series",
    "outstanding_refusals",
    "plan_indexed_series",
    "plan_series",
    "quiet_seconds_for",
    "refused_reason",
]


def plan_indexed_series(
    series: Series, config: NodeConfig, *, only_sop_uids: Iterable[str] | None = None
) -> PlanResult:
    """:func:`plan_series` with the spool and the tolerances ``config`` sets."""
    return plan_series(
        series,
        config.storage.spool_root,
        tolerances_from_config(config.completion),
        only_sop_uids=only_sop_uids,
    )


def plan_series(
    series: Series,
    spool_root: str | Path,
    tol: Tolerances | None = None,
    *,
    only_sop_uids: Iterable[str] | None = None,
) -> PlanResult:
    """Plan an indexed series from its instance rows (multi-frame files are read for frames).

    ``only_sop_uids`` restricts the plan to that instance set (a queued job re-plans exactly the
    instances it was keyed on, even if more arrived since). A series with an outstanding refused
    instance (:func:`outstanding_refusals`) is rejected as a whole, naming the slice.
    """
    session = object_session(series)
    refused = outstanding_refusals(session, series) if session is not None else []
    if refused:
        return Rejection(series.series_uid, refused_reason(refused))
    instances = list(series.instances)
    if only_sop_uids is not None:
        wanted = set(only_sop_uids)
        instances = [i for i in instances if i.sop_instance_uid in wanted]
        missing = wanted - {i.sop_instance_uid for i in instances}
        if missing:
            return Rejection(
                series.series_uid, f"{len(missing)} source instance(s) are no longer indexed"
            )
    refs: list[SliceRef] = []
    for inst in instances:
        try:
            refs.extend(SliceRef.from_row(inst, spool_root))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            return Rejection(
                series.series_uid,
                f"cannot read instance …{inst.sop_instance_uid[-12:]}: {exc}",
            )
    return plan_slices(series.series_uid, refs, tol)


def outstanding_refusals(session: Session, series: Series) -> list[Refusal]:
    """Instances of ``series`` that the receiver refused and nothing has made up for since.

    A refusal is made up for when an instance with the same SOP Instance UID is indexed in the
    series (the sender fixed it, or the refused copy was a bad resend of a stored one), or when
    an instance with the same InstanceNumber arrived after it (the sender replaced the slice
    under a new UID). Without either, the series lacks a slice its sender meant it to have.
    """
    refusals = refusals_for_series(session, series.series_uid)
    if not refusals:
        return []
    instances = list(series.instances)
    indexed = {i.sop_instance_uid for i in instances}
    return [
        r
        for r in refusals
        if r.sop_instance_uid not in indexed
        and not any(
            r.instance_number is not None
            and i.instance_number == r.instance_number
            and i.received_at >= r.at
            for i in instances
        )
    ]


def refused_reason(refused: Sequence[Refusal]) -> str:
    """One sentence for a series held back by refused instances: the first named, the rest
    counted."""
    first = refused[0]
    code = f"0x{first.status:04X}: " if first.status is not None else ""
    more = f" (and {len(refused) - 1} more refused instance(s))" if len(refused) > 1 else ""
    return (
        f"the whole series is rejected: {first.label} was refused at receive ({code}"
        f"{first.reason}){more}; the series is incomplete until it is sent again, fixed"
    )


# --- completion -------------------------------------------------------------------------------


def quiet_seconds_for(series: Series, config: NodeConfig) -> float:
    """The quiet period of the first rule whose metadata criteria match, else the default."""
    facts = facts_from_series(series)
    for rule in ordered_rules(config.rules):
        if rule.action.quiet_seconds is not None and metadata_matches(facts, rule):
            return rule.action.quiet_seconds
    return config.completion.quiet_seconds


def due_series(session: Session, config: NodeConfig, now: datetime | None = None) -> list[Series]:
    """Series in state receiving/changed whose quiet period is over, oldest first."""
    now = now or utcnow()
    min_quiet = min(
        [config.completion.quiet_seconds]
        + [r.action.quiet_seconds for r in config.rules if r.action.quiet_seconds is not None]
    )
    rows = session.scalars(
        select(Series)
        .where(Series.state.in_(_OPEN))
        .where(Series.last_received <= now - timedelta(seconds=min_quiet))
        .where(or_(Series.hold_until.is_(None), Series.hold_until <= now))
        .order_by(Series.last_received)
    ).all()
    return [
        s for s in rows if s.last_received <= now - timedelta(seconds=quiet_seconds_for(s, config))
    ]


_OPEN = (SeriesState.receiving, SeriesState.changed)


def hold_series(session: Session, series_uids: Iterable[str], until: datetime, reason: str) -> int:
    """Keep open series from completing before ``until`` (an association that stored into them
    ended without a release: the rest may follow). Returns how many were held; the caller
    commits."""
    uids = list(series_uids)
    if not uids:
        return 0
    rows = session.scalars(
        select(Series).where(Series.series_uid.in_(uids), Series.state.in_(_OPEN))
    ).all()
    return _hold(session, rows, until, reason)


def hold_unfinished_series(session: Session, until: datetime, reason: str | None) -> int:
    """At start-up: hold every series that was still open when the node stopped. Without a
    ``reason`` (a routine restart) the hold is silent: no reason shown, no audit event."""
    rows = session.scalars(select(Series).where(Series.state.in_(_OPEN))).all()
    return _hold(session, rows, until, reason)


def _hold(session: Session, rows: Sequence[Series], until: datetime, reason: str | None) -> int:
    for ser in rows:
        ser.hold_until = max(until, ser.hold_until or until)
        if reason is None:
            continue
        ser.state_reason = f"waiting until {ser.hold_until:%Y-%m-%d %H:%M:%S} UTC: {reason}"
        audit(
            session,
            "series_held",
            series_uid=ser.series_uid,
            detail={"until": ser.hold_until.isoformat(timespec="seconds"), "reason": reason},
        )
    return len(rows)
