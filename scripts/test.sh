#!/usr/bin/env bash
# Runs the whole test suite against the real PostgreSQL and Redis on this machine (started if they are down),
# with real Celery worker processes and headless Chromium. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the tests need: chromium for the browser tests, npm for Chart.js (the charts they look at).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium chromium-driver)
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing Debian's ${missing[*]} for the tests"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
scripts/setup.sh
# vLLM's own environment, so the deployments served by vLLM are tested too (about 3 minutes the first time);
# TUNEDECK_TEST_VLLM=0 skips it, and the vLLM tests then say they were skipped.
if [ "${TUNEDECK_TEST_VLLM:-1}" != 0 ]; then scripts/setup-vllm.sh; fi
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.5; done
fi

export DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
export CELERY_BROKER_URL=${TEST_CELERY_BROKER_URL:-redis://127.0.0.1:6379/15}
export TUNEDECK_DATA_DIR=${TUNEDECK_TEST_DATA_DIR:-$(mktemp -d -t tunedeck-test-XXXXXX)}
# The real default model for the tests marked slow, converted once and kept between runs.
export TUNEDECK_SMOLLM_DIR=${TUNEDECK_SMOLLM_DIR:-$PWD/var/test-models/SmolLM2-135M-Instruct}
.venv/bin/python -c "from finetune.modelstore import import_default_model as f; import sys; f(sys.argv[1])" "$TUNEDECK_SMOLLM_DIR" >/dev/null
exec .venv/bin/pytest "$@"
