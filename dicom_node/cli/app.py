"""The typer application object and helpers shared by every command module.

Exit codes: 0 ok, 1 operation failed, 2 usage/config error, 3 not found, 4 peer unreachable.
Errors are one clear line on stderr, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text
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
# Long lines stay one line (logs, grep). No markup: series descriptions, reasons and peer
# messages print exactly as they are (rich would drop '[lung]' or fail on '[/x]').
console = Console(soft_wrap=True, markup=False)
err_console = Console(stderr=True, soft_wrap=True, markup=False)


def styled(*parts: str | tuple[str, str]) -> Text:
    """One line from plain strings and (text, style) pairs; nothing in it is read as markup."""
    return Text.assemble(*parts)


ConfigOption = typer.Option(
    None,
    "--config",
    "-c",
    help="YAML config (default: $DICOM_NODE_CONFIG, else config/node.yaml)",
    show_default=False,
)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one error line and exit with ``code``."""
    err_console.print(styled(("error:", "red"), f" {message}"), highlight=False)
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
        print_config_errors(exc)
        raise typer.Exit(EXIT_CONFIG) from None


def print_config_errors(exc: ConfigError) -> None:
    """Every config error on its own line, with the file and the key path."""
    for key, msg in exc.errors:
        line = f" {exc.source}: {key or '<file>'}: {msg}"
        err_console.print(styled(("error:", "red"), line), highlight=False)
