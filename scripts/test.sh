#!/usr/bin/env bash
# README command 2: set up on a fresh machine, then run the linters (ruff, the import-linter architecture
# contracts in pyproject.toml) and the whole test suite against the
# real servers (sekmet-fhir, Orthanc, Chromium) that the tests start on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest "$@"
