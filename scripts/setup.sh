#!/usr/bin/env bash
# One-time setup: Debian tools used by tests (dcmtk, dicom3tools, orthanc and its DICOMweb
# plugin, prometheus, chromium and chromium-driver, postgresql), a .venv with the project and
# its test extras, and the CPU build of torch when no NVIDIA driver is present.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x /usr/bin/storescu ] || need_apt+=(dcmtk)
[ -x /usr/bin/dciodvfy ] || need_apt+=(dicom3tools)
[ -x /usr/sbin/Orthanc ] || need_apt+=(orthanc)
# Orthanc's DICOMweb plugin: the STOW-RS destination in the tests.
ls /usr/lib/orthanc/libOrthancDicomWeb.so* >/dev/null 2>&1 || need_apt+=(orthanc-dicomweb)
# The HTTP side's tests: a real Prometheus scrapes the node, a real headless browser drives the
# console (selenium talks to Debian's chromedriver; nothing downloads a browser or a driver).
[ -x /usr/bin/prometheus ] || need_apt+=(prometheus)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
# PostgreSQL: the tests start a private throw-away cluster (tests/support/postgres.py) from its
# binaries; no system-wide PostgreSQL service is used or started.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # --no-install-recommends keeps orthanc's optional plugins out; policy-rc.d stops the
  # packages from starting a system-wide Orthanc (port 4242), Prometheus (9090) or PostgreSQL
  # (5432) that would clash with tests.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q 'torch>=2.4,<3'
  else
    # The CPU wheel; an open range would pull a multi-GB CUDA build on a GPU-less machine.
    python -m pip install -q 'torch==2.13.0'
  fi
fi
# Build-backend warnings are noise here; the full log is kept for when something fails.
mkdir -p var
if ! python -m pip install -q -e '.[test]' >var/setup-pip.log 2>&1; then
  tail -n 40 var/setup-pip.log >&2
  echo "setup: pip install failed (full log: var/setup-pip.log)" >&2
  exit 1
fi
echo "setup complete: $(python -c 'import torch,sys;print("python",sys.version.split()[0],"torch",torch.__version__)')"
