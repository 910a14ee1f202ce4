#!/usr/bin/env bash
# The test command from the README: set everything up, then lint, type-check and run
# every test (slow end-to-end ones included). Extra arguments go to pytest, e.g.
#   ./scripts/test.sh -m "not slow"      the fast tests only
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EDGEFL_WITH_BROWSER=1 EDGEFL_WITH_POSTGRES=1 EDGEFL_WITH_DEVICES=1 bash scripts/bootstrap.sh
PY="$ROOT/.venv/bin/python"

printf '\033[1m==> ruff\033[0m\n'
"$PY" -m ruff check edge cloud protos devices tests benchmarks scripts
printf '\033[1m==> mypy\033[0m\n'
"$PY" -m mypy
printf '\033[1m==> pytest\033[0m\n'
set +e
"$PY" -m pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$code"
