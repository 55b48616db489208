"""``dicom-node`` command line. Command modules register themselves on :data:`app`."""

from __future__ import annotations

from dicom_node.cli import job_cmds, node_cmds  # noqa: F401  (each adds its commands to app)
from dicom_node.cli.app import app


def main() -> None:
    app()
