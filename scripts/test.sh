#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite plus the linter. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
python -m dicom_node.devtools.sample_data >/dev/null
ruff check .
ruff format --check .
python -m pytest "$@"
