#!/usr/bin/env bash
# README command 1: set up on a fresh machine, then run the end-to-end demo on the embedded sample studies.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/imaging-cds demo "$@"
