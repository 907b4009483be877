#!/usr/bin/env bash
# Sets up .venv and runs the test suite. Needs PostgreSQL on 127.0.0.1:5432 (MERGER_TEST_POSTGRES_URL overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
