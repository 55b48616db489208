"""Job commands: ``jobs list``, ``jobs show``, ``reprocess``, ``resend`` and ``rules test``.

They work on the database directly, so they need no running node; a running node picks up what
they queue within a second. Exit codes as in :mod:`dicom_node.cli.app`.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from dicom_node import operations
from dicom_node.cli.app import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    ConfigOption,
    app,
    console,
    db_fail,
    fail,
    get_config,
    sessions_for,
    styled,
)
from dicom_node.complete import plan_indexed_series
from dicom_node.db import Job, JobState, Series
from dicom_node.infer import ModelPool
from dicom_node.operations import job_as_dict, json_default
from dicom_node.plan import Rejection
from dicom_node.rules import explain, factor_for, facts_from_series
from dicom_node.web import queries

jobs_app = typer.Typer(help="Inspect and manage processing jobs.", no_args_is_help=True)
rules_app = typer.Typer(help="Check which rule applies to a series.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(rules_app, name="rules")

FINAL = (JobState.sent, JobState.failed, JobState.rejected)


def _parse_state(state: str | None) -> JobState | None:
    if state is None:
        return None
    try:
        return JobState(state)
    except ValueError:
        fail(f"unknown state {state!r}; one of {[s.value for s in JobState]}", EXIT_CONFIG)


@jobs_app.command("list")
def jobs_list(
    config_path: Path | None = ConfigOption,
    state: str | None = typer.Option(None, "--state", help="queued, running, written, sent, ..."),
    limit: int = typer.Option(50, "--limit", min=1),
    as_json: bool = typer.Option(False, "--json", help="one JSON array on stdout"),
) -> None:
    """List jobs, newest first. Failed jobs are the dead letters: ``--state failed``."""
    config = get_config(config_path)
    want = _parse_state(state)
    try:
        with sessions_for(config)() as s:
            q = select(Job).order_by(Job.id.desc()).limit(limit)
            if want is not None:
                q = q.where(Job.state == want)
            rows = s.scalars(q).all()
            data = [job_as_dict(j, config.storage.spool_root) for j in rows]
    except SQLAlchemyError as exc:
        db_fail(exc)
    if as_json:
        print(json.dumps(data, indent=1))
        return
    table = Table("id", "state", "series", "factor", "slices", "model", "supersedes", "reason")
    for d in data:
        slices = f"{d['n_in']}→{d['n_out']}" if d["n_out"] else str(d["n_in"] or "")
        table.add_row(
            str(d["id"]),
            d["state"],
            "…" + d["source_series_uid"][-16:],
            str(d["factor"]),
            slices,
            f"{d['model_id']} {d['model_version']}",
            str(d["supersedes_job_id"] or ""),
            (d["reason"] or "")[:60],
        )
    console.print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: int = typer.Argument(..., help="job id (see `jobs list`)"),
    config_path: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Everything about one job: state, reason, stage seconds, preview, what it supersedes,
    each destination's acknowledgements and last attempt, and its audit events (--json)."""
    config = get_config(config_path)
    try:
        with sessions_for(config)() as s:
            d = queries.job_detail(s, job_id, config.storage.spool_root)
    except SQLAlchemyError as exc:
        db_fail(exc)
    if d is None:
        fail(f"no job {job_id}", EXIT_NOT_FOUND)
    if as_json:
        print(json.dumps(d, indent=1, default=json_default))
        return
    console.print(styled((f"job {d['id']}", "bold"), "  state ", (d["state"], "bold")))
    if d["reason"]:
        console.print(f"reason: {d['reason']}")
    console.print(f"source series: {d['source_series_uid']}")
    console.print(f"rule: {d['rule']}  factor {d['factor']} ({d['factor_reason'] or ''})")
    console.print(f"model: {d['model_id']} {d['model_version']}")
    if d["model_note"]:
        console.print(styled(("note:", "yellow"), f" {d['model_note']}"))
    if d["n_out"]:
        console.print(
            f"slices: {d['n_in']} → {d['n_out']}, spacing {d['spacing_in_mm']} → "
            f"{d['spacing_out_mm']} mm"
        )
    console.print(f"derived series: {d['derived_series_uid'] or '-'}")
    console.print(f"derived files: {d['derived_dir'] or '-'}")
    console.print(f"preview: {d['preview_path'] or '-'}")
    if d["supersedes_job_id"]:
        delivered = d["replaces_delivered_job"] is not None
        console.print(
            f"supersedes: job {d['supersedes_job_id']} (derived series "
            f"{d.get('supersedes_derived_series_uid') or '-'})"
            + (", already delivered: this series is marked REPLACES EARLIER" if delivered else "")
        )
    if d["superseded_by_job_id"]:
        console.print(
            styled(
                ("superseded", "yellow"),
                f" by job {d['superseded_by_job_id']}: the source series changed after this one",
            )
        )
    stages = d["stage_seconds"]
    if stages:
        console.print("stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    console.print(f"send attempts: {d['send_attempts']}")
    for send in d["sends"]:
        last = send["last_attempt"]
        console.print(
            f"  to {send['destination']}: {send['acknowledged']} of {send['of']} acknowledged, "
            f"{send['attempts']} attempt(s)"
            + (f", last {json_default(last)} UTC" if last else "")
            + (f": {send['last_failure']}" if send["last_failure"] else "")
        )
    if d["next_send_at"]:
        console.print(f"next send attempt: {d['next_send_at']} UTC")
    for note in d["notes"]:
        console.print(f"plan note: {note}")
    for note in d["writer_notes"]:
        console.print(f"writer note: {note}")


# -- reprocess / resend --------------------------------------------------------------------------


def _who() -> str:
    """Who runs the command, for the audit trail: the operating-system user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return f"uid {os.getuid()}"


def _wait(sessions, job_id: int, seconds: float) -> JobState:
    deadline = time.monotonic() + seconds
    while True:
        with sessions() as s:
            job = s.get(Job, job_id)
            state = job.state if job else JobState.failed
        if state in FINAL or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def _report_wait(sessions, job_id: int, seconds: float) -> None:
    """``--wait``: print the job's state after at most ``seconds``; exit 1 unless it was sent."""
    if seconds <= 0:
        return
    state = _wait(sessions, job_id, seconds)
    console.print(f"job {job_id}: {state.value}")
    if state is not JobState.sent:
        raise typer.Exit(EXIT_FAILED)


@contextmanager
def _operation_errors() -> Iterator[None]:
    """Exit with one line for what an operator action can run into (see the exit codes)."""
    try:
        yield
    except operations.NotFound as exc:
        fail(str(exc), EXIT_NOT_FOUND)
    except operations.NotPossible as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        db_fail(exc)


@app.command()
def reprocess(
    series_uid: str = typer.Argument(..., help="SeriesInstanceUID of a received series"),
    config_path: Path | None = ConfigOption,
    force: bool = typer.Option(
        False, "--force", help="run again even if this exact input was already processed"
    ),
    wait: float = typer.Option(0, "--wait", help="wait up to this many seconds for the result"),
) -> None:
    """Process a series again from its retained source files.

    The same instances with the same model and factor give the same job and the same UIDs, so a
    PACS never gets a second copy. Without ``--force`` a finished job is left alone.
    """

    config = get_config(config_path)
    sessions = sessions_for(config)
    with _operation_errors(), sessions() as s:
        done = operations.reprocess(
            s, config, series_uid, ModelPool(config.model), force=force, by=_who(), via="cli"
        )
    if done.action == "already_done":
        console.print(f"{done.message}. Use --force to run it again.")
        return
    console.print(done.message)
    _report_wait(sessions, done.job_id, wait)


@app.command()
def resend(
    job_id: int = typer.Argument(..., help="job id"),
    config_path: Path | None = ConfigOption,
    all_instances: bool = typer.Option(
        False, "--all", help="also resend instances the destination already acknowledged"
    ),
    wait: float = typer.Option(0, "--wait", help="wait up to this many seconds for the result"),
) -> None:
    """Send a written job's derived series again (only unacknowledged instances by default)."""

    config = get_config(config_path)
    sessions = sessions_for(config)
    with _operation_errors(), sessions() as s:
        operations.resend(s, config, job_id, all_instances=all_instances, by=_who(), via="cli")
    console.print(f"job {job_id} will be sent again")
    _report_wait(sessions, job_id, wait)


# -- rules test ----------------------------------------------------------------------------------


@rules_app.command("test")
def rules_test(
    series_uid: str = typer.Argument(..., help="SeriesInstanceUID of a received series"),
    config_path: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show the series' geometry, which rule matches and why, or why none does."""

    config = get_config(config_path)
    try:
        with sessions_for(config)() as s:
            series = s.scalars(select(Series).where(Series.series_uid == series_uid)).first()
            if series is None:
                fail(f"no series {series_uid}", EXIT_NOT_FOUND)
            plan = plan_indexed_series(series, config)
            rejected = plan.reason if isinstance(plan, Rejection) else None
            facts = facts_from_series(series, None if isinstance(plan, Rejection) else plan)
            expl = explain(facts, config.rules)
    except SQLAlchemyError as exc:
        db_fail(exc)
    chosen = next((e for e in expl if e.matched), None)
    decision = factor_for(chosen.rule, facts.spacing_mm) if chosen and facts.spacing_mm else None
    out = {
        "series_uid": series_uid,
        "geometry": None if rejected else plan.summary(),
        "rejected": rejected,
        "rules": [{"rule": e.rule.name, "matched": e.matched, "reasons": e.reasons} for e in expl],
        "selected": chosen.rule.name if chosen and not rejected else None,
        "factor": decision.factor if decision else None,
        "factor_reason": decision.reason if decision else None,
    }
    if as_json:
        print(json.dumps(out, indent=1))
        return
    if rejected:
        console.print(styled(("geometry rejected:", "red"), f" {rejected}"))
    else:
        g = out["geometry"]
        console.print(
            f"geometry: {g['n_slices']} slices {g['rows']}x{g['columns']}, spacing "
            f"{g['spacing_mm']} mm, thickness {g['slice_thickness_mm']} mm, tilt {g['tilt_deg']}°"
        )
        for note in g["notes"]:
            console.print(f"  note: {note}")
    console.print(
        f"facts: modality {facts.modality}, body part {facts.body_part or '-'}, calling AE "
        f"{facts.calling_ae or '-'}"
    )
    if not expl:
        console.print("no rules are configured")
    for e in expl:
        mark = ("MATCH", "green") if e.matched else ("no match", "red")
        console.print(styled(f"rule {e.rule.name!r} (priority {e.rule.action.priority}): ", mark))
        for r in e.reasons:
            console.print(f"    {r}")
    if rejected:
        console.print("result: the series is rejected before rules apply")
        raise typer.Exit(EXIT_FAILED)
    if chosen is None:
        console.print("result: no rule matches; the series is ignored")
        raise typer.Exit(EXIT_FAILED)
    console.print(f"result: rule {chosen.rule.name!r}; {out['factor_reason']}")
    if out["factor"] is None:
        raise typer.Exit(EXIT_FAILED)
