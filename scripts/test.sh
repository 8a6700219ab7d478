#!/usr/bin/env bash
# The README's test command: install the project with its dev extras, lint and format-check, and run the CPU test suite.
# Triton kernels run under the Triton interpreter when no GPU is present (tests/conftest.py turns it on).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k masked`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
python -m ruff check .
python -m ruff format --check .
python -m pip list --format=freeze | grep -i -E '^(torch|torchvision|triton|timm|numpy|pytest|ruff)=' | tr '\n' ' '; echo
set +e
python -m pytest -m "not gpu" "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then  # pytest: no tests collected (e.g. a -k filter that matches nothing)
  echo "pytest collected no tests"
  exit 0
fi
exit "$status"
