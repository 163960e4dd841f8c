#!/usr/bin/env bash
# Set up everything imaging-cds needs on a fresh Debian machine, idempotently:
#   - Debian packages: Orthanc + its DICOMweb plugin (the PACS), redis-server, chromium (browser tests), wrk (benchmarks)
#   - .venv      : the project (torch 2.13.0 CPU build pinned first, then the package with its test extras)
#   - .venv-fhir : the sekmet-fhir R4 server in its own venv (its pins differ from ours)
#   - devtools/medplum/node_modules : Medplum's FHIR engine (npm, the versions locked in package-lock.json)
# Where something cannot be installed (no apt, not root) it stops and says exactly what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
need_apt=()
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)

if [ ${#need_apt[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: missing Debian packages: ${need_apt[*]} and no apt-get here." >&2
    echo "       Install them with your system's package manager (Orthanc 1.10+ with its DICOMweb plugin)." >&2
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages: ${need_apt[*]}; installing them needs root:" >&2
    echo "       sudo apt-get update && sudo apt-get install -y ${need_apt[*]}" >&2
    exit 1
  fi
  echo "setup: installing Debian packages: ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "setup: Python 3.11 or newer is needed ($PYTHON is $("$PYTHON" --version 2>&1))." >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages.
if ! .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU build)"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
fi
stamp=.venv/.imaging-cds-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing imaging-cds and its dependencies"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test,serve]"
  touch "$stamp"
fi

if [ ! -x .venv-fhir/bin/sekmet ]; then
  echo "setup: installing the sekmet-fhir R4 server in .venv-fhir"
  "$PYTHON" -m venv .venv-fhir
  .venv-fhir/bin/pip install -q --disable-pip-version-check "sekmet-fhir==0.1.1"
fi
medplum=devtools/medplum
if [ ! -d "$medplum/node_modules/@medplum/fhir-router" ] || [ "$medplum/package-lock.json" -nt "$medplum/node_modules/.package-lock.json" ]; then
  echo "setup: installing Medplum's FHIR engine (npm) in $medplum"
  (cd "$medplum" && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "setup: ready"
