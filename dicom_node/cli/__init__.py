"""``dicom-node`` command line. Command modules register themselves on :data:`app`."""

from __future__ import annotations

import importlib

from dicom_node.cli.app import app

# Each module adds its commands to ``app`` on import; a missing optional module is skipped.
for _name in ("node_cmds", "job_cmds"):
    try:
        importlib.import_module(f"dicom_node.cli.{_name}")
    except ModuleNotFoundError as _exc:  # pragma: no cover - during development only
        if _exc.name != f"dicom_node.cli.{_name}":
            raise


def main() -> None:
    app()
