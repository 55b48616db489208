"""Node administration commands: serve, status (the whole installation), health, series, config
check, echo, db upgrade.

Exit codes (see :mod:`dicom_node.cli.app`): 0 ok, 1 failed, 2 usage/config error, 3 not found,
4 peer unreachable. Every error is one line on stderr.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime
from pathlib import Path

import pydicom.config
import typer
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from dicom_node import db, nodes
from dicom_node.cli.app import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_UNREACHABLE,
    ConfigOption,
    app,
    console,
    db_fail,
    err_console,
    fail,
    get_config,
    print_config_errors,
    sessions_for,
    styled,
)
from dicom_node.config import (
    ConfigError,
    DicomWebDestination,
    check_database_path,
    check_environment,
    config_warnings,
    load_config,
    resolve_config_path,
)
from dicom_node.infer import ModelPool, ModelUnavailable
from dicom_node.logs import configure_logging
from dicom_node.node import Node, StartupError, read_status, status_problem
from dicom_node.operations import json_default, series_as_dict
from dicom_node.send import destination_from_config
from dicom_node.send import echo as send_echo
from dicom_node.stow import StowTarget, stow_echo
from dicom_node.web import HttpBindError, queries

series_app = typer.Typer(help="Inspect received series.", no_args_is_help=True)
config_app = typer.Typer(help="Check the configuration.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(series_app, name="series")
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")


# -- serve ---------------------------------------------------------------------------------------


@app.command()
def serve(
    config_path: Path | None = ConfigOption,
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING, ERROR"),
    role: str | None = typer.Option(
        None, "--role", help="all, receiver or worker (default: node.role, else all)"
    ),
) -> None:
    """Run the node (receiver, pipeline, and the HTTP side when ``http.enabled``) until
    SIGTERM/SIGINT. ``--role receiver`` receives and queues jobs, ``--role worker`` runs them."""
    config = get_config(config_path)
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        fail(f"unknown log level {log_level!r}", EXIT_CONFIG)
    if role is not None:
        if role not in ("all", "receiver", "worker"):
            fail(f"unknown role {role!r} (all, receiver or worker)", EXIT_CONFIG)
        config = config.model_copy(update={"node": config.node.model_copy(update={"role": role})})
    # The same checks as `config check`, before anything listens or writes: a missing
    # directory or certificate is named by its key, not reported as "cannot listen".
    _exit_on_problems(resolve_config_path(config_path), check_environment(config, create=True))
    configure_logging(level, config.logging.format)  # text, or one JSON object per line
    # pynetdicom logs every PDU at INFO; keep only its warnings unless debugging.
    if level > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)

    # pydicom's warnings about invalid values quote the value, which may be a patient's name:
    # the node reads leniently and never logs them.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    for warning in config_warnings(config):
        logging.getLogger("dicom_node").warning("config: %s", warning)
    try:
        Node(config).run_forever()
    except HttpBindError as exc:
        _exit_on_problems(resolve_config_path(config_path), [("http.port", exc.strerror)])
    except StartupError as exc:
        _exit_on_problems(resolve_config_path(config_path), [(exc.key, exc.reason)])
    except OSError as exc:
        fail(
            f"cannot listen on {config.node.bind_address}:{config.node.port}: {exc.strerror or exc}"
        )
    except SQLAlchemyError as exc:
        db_fail(exc)


# -- status --------------------------------------------------------------------------------------


@app.command()
def status(
    config_path: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """The whole installation from the database (every node sharing it, alive, stale or
    stopped; the queue by job state; each destination's last success and failure), counts,
    free disk, and this configuration's own node from its status file (open associations,
    loop health)."""
    config = get_config(config_path)
    try:
        with sessions_for(config)() as s:
            report = _database_report(s, config)
    except SQLAlchemyError as exc:
        db_fail(exc)
    running = read_status(config)
    report = {
        "node": {
            "running": running is not None,
            "pid": running and running.get("pid"),
            "ae_title": config.node.ae_title,
            "port": (running or {}).get("port", config.node.port),
            "started": running and running.get("started"),
        },
        **report,
        "disk": _disk_report(config),
        "associations": (running or {}).get("associations", []),
        "health": (running or {}).get("health"),
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_status(report)


def _database_report(s, config) -> dict:
    """What ``status`` reads from the database: counts, states, nodes and destinations."""
    counts = {
        "studies": s.scalar(select(func.count(db.Study.id))),
        "series": s.scalar(select(func.count(db.Series.id))),
        "instances": s.scalar(select(func.count(db.Instance.id))),
        # int(): PostgreSQL sums a bigint column as numeric, which JSON cannot hold (Decimal)
        "bytes": int(s.scalar(select(func.coalesce(func.sum(db.Instance.file_size), 0)))),
    }
    destinations = [
        {
            "name": d["name"],
            "address": d["address"],
            "last_success": _iso(d["last_success"]),
            "last_failure": _iso(d["last_failure"]),
            "last_failure_reason": d["last_failure_reason"],
        }
        for d in queries.destination_status(s, config, queries.LastSuccess())
    ]
    return {
        "nodes": nodes.list_nodes(s),
        "counts": counts,
        "series_by_state": queries.count_by_state(s, "series"),
        "jobs_by_state": queries.count_by_state(s, "jobs"),
        "destinations": destinations,
    }


def _iso(at) -> str | None:
    return None if at is None else at.isoformat(timespec="seconds") + "Z"  # naive UTC


def _disk_report(config) -> dict:
    spool = Path(config.storage.spool_dir)
    try:
        free = shutil.disk_usage(spool if spool.exists() else spool.parent).free
    except OSError:
        free = None
    return {
        "spool": str(spool),
        "free_bytes": free,
        "min_free_bytes": config.storage.min_free_bytes,
        "below_minimum": free is not None and free < config.storage.min_free_bytes,
    }


def _print_status(report: dict) -> None:
    n, counts = report["node"], report["counts"]
    if n["running"]:
        console.print(
            styled(
                "node ",
                ("running", "green"),
                f" pid {n['pid']} {n['ae_title']}@{n['port']} since {n['started']}",
            )
        )
    else:
        console.print(styled("node ", ("not running", "yellow"), f" ({n['ae_title']}@{n['port']})"))
    _print_nodes(report["nodes"])
    console.print(
        f"studies {counts['studies']}  series {counts['series']}  instances {counts['instances']}"
        f"  ({counts['bytes'] / 1e6:.1f} MB)"
    )
    for key, label in (("series_by_state", "series"), ("jobs_by_state", "jobs")):
        if report[key]:
            by_state = ", ".join(f"{k} {v}" for k, v in sorted(report[key].items()))
            console.print(f"{label} by state: {by_state}")
    _print_destinations(report["destinations"])
    d = report["disk"]
    if d["free_bytes"] is not None:
        flag = (" BELOW MINIMUM: new associations refused", "red") if d["below_minimum"] else ""
        console.print(
            styled(
                f"disk free {d['free_bytes'] / 1e9:.1f} GB (minimum {d['min_free_bytes'] / 1e9:.1f}"
                f" GB) at {d['spool']}",
                flag,
            )
        )
    _print_health(report["health"])
    assocs = report["associations"]
    console.print(f"associations open: {len(assocs)}")
    for a in assocs:
        console.print(
            f"  {a['calling_ae']} from {a['peer']}:{a['port']} since {a['started']}"
            f" stored {a['stored']} failed {a['failed']}"
            + (f" (process {a['pid']})" if a.get("pid") else "")
        )


NODE_STATE_STYLES = {"alive": "green", "stale": "red", "stopped": "dim"}


def _print_nodes(rows: list[dict]) -> None:
    if not rows:
        console.print("nodes in the database: none yet")
        return
    table = Table("node", "role", "host", "state", "last seen", "model", "devices")
    for r in rows:
        model = f"{r['model_id']} {r['model_version']}" if r["model_id"] else ""
        table.add_row(
            r["id"],
            r["role"],
            r["host"],
            styled((r["state"], NODE_STATE_STYLES[r["state"]])),
            f"{r['last_seen_age_s']:.0f} s ago",
            model,
            r["devices"] or "",
        )
    console.print(table)


def _print_destinations(rows: list[dict]) -> None:
    for d in rows:
        ok = d["last_success"] or "never"
        line = f"destination {d['name']} ({d['address']}): last success {ok}"
        if d["last_failure"]:
            line += f", last failure {d['last_failure']}: {d['last_failure_reason']}"
        console.print(line, highlight=False)


def _print_health(health: dict | None) -> None:
    if health is None:
        return
    if health["healthy"]:
        console.print(styled("pipeline ", ("healthy", "green")))
        return
    console.print(styled("pipeline ", ("UNHEALTHY", "red")))
    for problem in health["problems"]:
        console.print(f"  {problem}")


@app.command()
def health(
    config_path: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Health check for monitoring: exit 0 when the node runs and every loop works, 1 when the
    node is not running or a loop has stalled (each problem is printed)."""
    config = get_config(config_path)
    running = read_status(config)
    if running is None:
        report = {"healthy": False, "problems": [status_problem(config)], "loops": {}}
    else:
        report = running.get("health") or {"healthy": True, "problems": [], "loops": {}}
    if as_json:
        print(json.dumps(report, indent=2))
    elif report["healthy"]:
        console.print(styled(("healthy", "green")))
    else:
        for problem in report["problems"]:
            err_console.print(f"unhealthy: {problem}")
    if not report["healthy"]:
        raise typer.Exit(EXIT_FAILED)


# -- series --------------------------------------------------------------------------------------


@series_app.command("list")
def series_list(
    config_path: Path | None = ConfigOption,
    state: str | None = typer.Option(None, "--state", help="only series in this state"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per series, in a list"),
) -> None:
    """List received series, newest first."""
    config = get_config(config_path)
    if state is not None:
        try:
            state_enum = db.SeriesState(state)
        except ValueError:
            fail(
                f"unknown state {state!r}; one of: {', '.join(s.value for s in db.SeriesState)}",
                EXIT_CONFIG,
            )
    Session = sessions_for(config)
    counts = (
        select(db.Instance.series_id, func.count(db.Instance.id).label("n"))
        .group_by(db.Instance.series_id)
        .subquery()
    )
    q = (
        select(db.Series, func.coalesce(counts.c.n, 0), db.Study.study_uid)
        .join(db.Study, db.Study.id == db.Series.study_id)
        .outerjoin(counts, counts.c.series_id == db.Series.id)
        .order_by(db.Series.last_received.desc())
    )
    if state is not None:
        q = q.where(db.Series.state == state_enum)
    try:
        with Session() as s:
            rows = [series_as_dict(se, st, n) for se, n, st in s.execute(q).all()]
    except SQLAlchemyError as exc:
        db_fail(exc)
    if as_json:
        print(json.dumps(rows, indent=2, default=json_default))
        return
    table = Table("series UID", "mod", "n", "state", "last received", "reason")
    for r in rows:
        table.add_row(
            r["series_uid"],
            r["modality"] or "",
            str(r["n_instances"]),
            r["state"],
            json_default(r["last_received"]),
            r["state_reason"] or "",
        )
    console.print(table)


@series_app.command("show")
def series_show(
    uid: str = typer.Argument(..., help="SeriesInstanceUID"),
    config_path: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """One series: its state, instances with geometry, and audit events."""
    config = get_config(config_path)
    Session = sessions_for(config)
    try:
        with Session() as s:
            series = s.scalars(select(db.Series).where(db.Series.series_uid == uid)).first()
            if series is None:
                fail(f"no series {uid}", EXIT_NOT_FOUND)
            study_uid = s.get(db.Study, series.study_id).study_uid
            insts = s.scalars(
                select(db.Instance)
                .where(db.Instance.series_id == series.id)
                .order_by(db.Instance.instance_number, db.Instance.sop_instance_uid)
            ).all()
            events = s.scalars(
                select(db.AuditEvent)
                .where(db.AuditEvent.series_uid == uid)
                .order_by(db.AuditEvent.at.desc())
                .limit(20)
            ).all()
            info = series_as_dict(series, study_uid, len(insts))
            info["instances"] = [
                {
                    "sop_instance_uid": i.sop_instance_uid,
                    "sop_class_uid": i.sop_class_uid,
                    "instance_number": i.instance_number,
                    "image_position": i.image_position,
                    "image_orientation": i.image_orientation,
                    "pixel_spacing": i.pixel_spacing,
                    "slice_thickness": i.slice_thickness,
                    "rows": i.rows,
                    "columns": i.columns,
                    "number_of_frames": i.number_of_frames,
                    "transfer_syntax_uid": i.transfer_syntax_uid,
                    "file_path": i.file_path,
                    "file_size": i.file_size,
                }
                for i in insts
            ]
            info["audit"] = [
                {"at": e.at.isoformat(timespec="seconds"), "kind": e.kind, "detail": e.detail}
                for e in events
            ]
    except SQLAlchemyError as exc:
        db_fail(exc)
    if as_json:
        print(json.dumps(info, indent=2, default=json_default))
        return
    for key in ("series_uid", "study_uid", "modality", "series_number", "series_description",
                "body_part", "n_instances", "state", "state_reason", "revision", "calling_ae",
                "first_received", "last_received", "hold_until"):  # fmt: skip
        value = info[key]
        shown = (
            "" if value is None else json_default(value) if isinstance(value, datetime) else value
        )
        console.print(f"{key:>20}: {shown}", highlight=False)
    table = Table("#", "SOP instance UID", "position", "thick", "size", "TS")
    for i in info["instances"]:
        pos = i["image_position"]
        table.add_row(
            str(i["instance_number"] or ""),
            i["sop_instance_uid"],
            ", ".join(f"{v:.2f}" for v in pos) if pos else "",
            "" if i["slice_thickness"] is None else f"{i['slice_thickness']:g}",
            f"{i['rows']}x{i['columns']}",
            i["transfer_syntax_uid"],
        )
    console.print(table)
    for e in info["audit"]:
        console.print(f"  {e['at']} {e['kind']} {e['detail'] or ''}", highlight=False)


# -- config --------------------------------------------------------------------------------------


@config_app.command("check")
def config_check(config_path: Path | None = ConfigOption) -> None:
    """Validate the config; print every error with its key path (exit 2 if any)."""
    path = resolve_config_path(config_path)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print_config_errors(exc)
        raise typer.Exit(EXIT_CONFIG) from None
    _exit_on_problems(path, check_environment(config))
    try:
        ident = ModelPool(config.model).identity()
    except ModelUnavailable as exc:
        err_console.print(styled(("error:", "red"), f" {path}: model: {exc}"), highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None
    if ident.note:
        err_console.print(styled(("warning:", "yellow"), f" {ident.note}"), highlight=False)
    for warning in config_warnings(config):
        err_console.print(styled(("warning:", "yellow"), f" {path}: {warning}"), highlight=False)
    console.print(
        f"{path}: ok (model {ident.model_id} {ident.model_version}; "
        f"AE {config.node.ae_title} on {config.node.bind_address}:"
        f"{config.node.port}, {len(config.allowed_callers)} allowed callers, "
        f"{len(config.destinations)} destinations, {len(config.rules)} rules)",
        highlight=False,
    )


# -- echo ----------------------------------------------------------------------------------------


@app.command()
def echo(
    destination: str = typer.Argument(..., help="name of a configured destination"),
    config_path: Path | None = ConfigOption,
    timeout: float = typer.Option(10, "--timeout", help="seconds for connect and each reply"),
) -> None:
    """C-ECHO a configured destination (exit 4 when it cannot be reached or refuses); for a
    DICOMweb destination a QIDO-RS ``GET {url}/studies?limit=1`` with its credentials.

    Uses the association set-up of sending (TCP_NODELAY, TLS with certificate and host name
    checks), so a passing echo means a send can get through.
    """
    config = get_config(config_path)
    try:
        dcfg = config.destination(destination)
    except KeyError:
        names = ", ".join(d.name for d in config.destinations) or "none configured"
        fail(f"no destination named {destination!r} ({names})", EXIT_NOT_FOUND)
    if isinstance(dcfg, DicomWebDestination):
        _echo_dicomweb(dcfg)
        return
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    try:
        dest = destination_from_config(dcfg)
    except (OSError, ValueError) as exc:  # unreadable certificate, key or CA file
        fail(f"{dcfg.name}: TLS set-up failed: {exc}", EXIT_CONFIG)
    status, failure, seconds = send_echo(
        dest, calling_ae_title=config.node.ae_title, timeout=timeout
    )
    where = f"{dcfg.name} ({dest})"
    if failure is not None:
        fail(f"{dcfg.name}: {failure.reason} ({failure.kind.value})", EXIT_UNREACHABLE)
    if status != 0:
        fail(f"{where} answered C-ECHO with status 0x{status:04X}", EXIT_FAILED)
    console.print(f"{where}: C-ECHO ok in {seconds * 1000:.0f} ms")


def _echo_dicomweb(dcfg: DicomWebDestination) -> None:
    try:
        target = StowTarget(dcfg)
    except OSError as exc:  # an unreadable credential file
        fail(f"{dcfg.name}: cannot read its credentials: {exc.strerror}", EXIT_CONFIG)
    status, failure, seconds = stow_echo(target)
    if failure is not None:
        fail(f"{target}: {failure.reason} ({failure.kind.value})", EXIT_UNREACHABLE)
    console.print(f"{target}: QIDO-RS answered HTTP {status} in {seconds * 1000:.0f} ms")


# -- db ------------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(config_path: Path | None = ConfigOption) -> None:
    """Create or upgrade the database schema to the newest revision."""
    config = get_config(config_path)
    _exit_on_problems(resolve_config_path(config_path), check_database_path(config.database.url))
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        db.upgrade(config.database.url)
    except Exception as exc:
        fail(f"database upgrade failed: {str(exc).splitlines()[0][:200]}", EXIT_FAILED)
    console.print(f"database at newest schema: {config.database.url}", highlight=False)


def _exit_on_problems(path: Path, problems: list[tuple[str, str]]) -> None:
    """Print each problem as ``error: FILE: key.path: reason`` and exit 2, if there is any."""
    if problems:
        print_config_errors(ConfigError(str(path), problems))
        raise typer.Exit(EXIT_CONFIG)


__all__ = ["app", "EXIT_FAILED"]
