#!/usr/bin/env bash
# The main job with embedded defaults: set up (idempotent), start the node on a free
# non-privileged port with config/node.example.yaml (spool and SQLite DB under ./var/demo), send
# the real 20-slice CT series with dcmtk storescu, wait for the ACVTT job, receive the derived
# thin-slice series in a local destination, write the PNG preview and print a summary.
#   ./scripts/demo.sh [--timeout SECONDS]   (uses the shipped default model)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
exec python -m dicom_node.devtools.demo "$@"
