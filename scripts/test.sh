#!/usr/bin/env bash
# README command 2: set up on a fresh machine, then run the linters and the whole test suite against the
# real servers (sekmet-fhir, Orthanc, Chromium) that the tests start on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
