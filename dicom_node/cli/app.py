"""The typer application object and helpers shared by every command module.

Exit codes: 0 ok, 1 operation failed, 2 usage/config error, 3 not found, 4 peer unreachable.
Errors are one clear line on stderr, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import db
from dicom_node.config import ConfigError, NodeConfig, load_config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_NOT_FOUND = 3
EXIT_UNREACHABLE = 4

app = typer.Typer(
    name="dicom-node",
    help="ACVTT DICOM node: receive thick CT, interpolate, send thin CT back.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)  # long lines stay one line (logs, grep)
err_console = Console(stderr=True, soft_wrap=True)

ConfigOption = typer.Option(
    None,
    "--config",
    "-c",
    help="YAML config (default: $DICOM_NODE_CONFIG, else config/node.yaml)",
    show_default=False,
)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one error line and exit with ``code``."""
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def sessions_for(config: NodeConfig) -> sessionmaker[Session]:
    """A session factory for the index database named in ``config``."""
    return db.make_session_factory(
        db.make_engine(config.database.url, config.database.busy_timeout_ms)
    )


def db_fail(exc: Exception) -> NoReturn:
    """Exit with one line for a database error (a missing schema names the fix)."""
    text = str(exc).splitlines()[0][:200]
    if "no such table" in text:
        fail("the database has no schema yet: run `dicom-node db upgrade`")
    fail(f"database error: {text}")


def get_config(path: Path | None) -> NodeConfig:
    """Load the config or exit 2 with every error listed, one per line."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for key, msg in exc.errors:
            err_console.print(f"[red]error:[/red] {exc.source}: {key or '<file>'}: {msg}")
        raise typer.Exit(EXIT_CONFIG) from None
