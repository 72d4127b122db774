#!/usr/bin/env bash
# Set up a virtual environment (.venv) and run the whole test suite:
# unit tests in tests/ and nbval over every notebook in notebooks/, in fast mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
unset MPLBACKEND  # a forced Agg backend breaks nbval's comparison of figure cells
export FSO_FAST=1
exec .venv/bin/python -m pytest "$@"
