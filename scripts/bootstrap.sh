#!/usr/bin/env bash
# Create ./.venv (if missing) and install medcli with its test, export and dicom extras into it.
# Idempotent: re-running it only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so pip does not pick another build while resolving medcli's needs.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e '.[test,export,dicom]'
.venv/bin/medcli --version >&2
