#!/usr/bin/env bash
# Sets up .venv and runs the test suite. Needs PostgreSQL on 127.0.0.1:5432 (MERGER_TEST_POSTGRES_URL overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# two processes (pytest-xdist), a test file per process at a time: module-scoped servers stay in one process
exec .venv/bin/python -m pytest -n "${MERGER_TEST_PROCESSES:-2}" --dist loadfile "$@"
