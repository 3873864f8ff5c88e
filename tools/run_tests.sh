#!/usr/bin/env bash
# Sets up .venv (tools/install.sh, fast when cached) and runs the test suite.
#   bash tools/run_tests.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/install.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
