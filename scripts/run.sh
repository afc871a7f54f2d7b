#!/usr/bin/env bash
# Sets up and runs Tunedeck: installs into .venv, migrates, imports the default base model, creates the demo
# user, starts a training worker, a dataset worker, an interactive worker and the inference server, and serves the web app. A part
# that exits (killed for memory, say) is started again after a back-off, with a line here and in its log; the others
# go on. Ctrl-C stops everything.
# Production settings unless a developer asks otherwise (TUNEDECK_ENV=development or TUNEDECK_DEBUG=1): DEBUG off,
# a random SECRET_KEY made once in $TUNEDECK_DATA_DIR/secret-key (mode 0600), served on 127.0.0.1 only (HOST opens
# it wider). README, "Production and security".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export TUNEDECK_DATA_DIR=${TUNEDECK_DATA_DIR:-$PWD/var}
PORT=${PORT:-8000}
HOST=${HOST:-127.0.0.1}
DEMO_USER=${DEMO_USER:-demo}
DEMO_PASSWORD=${DEMO_PASSWORD:-demo}
mkdir -p "$TUNEDECK_DATA_DIR/logs"
py=.venv/bin/python

echo "== database: ${DATABASE_URL:-embedded SQLite in $TUNEDECK_DATA_DIR}"
echo "== broker:   ${CELERY_BROKER_URL:-embedded SQLite broker in $TUNEDECK_DATA_DIR}"
$py manage.py migrate --noinput -v0
echo "== importing the default base model (converted from GGUF once; later runs skip this)"
$py manage.py import_default_model
$py manage.py createuser "$DEMO_USER" --password "$DEMO_PASSWORD" --admin >/dev/null
$py manage.py collectstatic --noinput -v0

# A part that exits is started again: after RESTART_DELAY seconds, doubled at each exit up to RESTART_DELAY_MAX, and
# back to RESTART_DELAY once it had run for a minute. Each supervisor is a subshell that ends its part on TERM.
RESTART_DELAY=${RESTART_DELAY:-1}
RESTART_DELAY_MAX=${RESTART_DELAY_MAX:-30}
pids=()
supervise() {  # supervise NAME LOG COMMAND...: runs COMMAND (output to LOG), restarting it whenever it exits
  local name=$1 log=$2
  shift 2
  : >"$log"
  (
    child=""
    trap '[ -n "$child" ] && kill "$child" 2>/dev/null; [ -n "$child" ] && wait "$child" 2>/dev/null; exit 0' TERM
    delay=$RESTART_DELAY
    while true; do
      started=$SECONDS
      "$@" >>"$log" 2>&1 &
      child=$!
      code=0
      wait "$child" || code=$?
      if (( SECONDS - started >= 60 )); then delay=$RESTART_DELAY; fi
      echo "!! $(date '+%Y-%m-%d %H:%M:%S') $name (pid $child) exited with code $code; restarting it in ${delay}s" \
        | tee -a "$log" >&2
      sleep "$delay" &
      child=$!
      wait "$child" || true
      delay=$(( delay * 2 > RESTART_DELAY_MAX ? RESTART_DELAY_MAX : delay * 2 ))
    done
  ) &
  pids+=($!)
}
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
logs=$TUNEDECK_DATA_DIR/logs
# One training job per worker process (concurrency 1, prefetch 1); datasets are processed by a second worker.
supervise "the gpu worker" "$logs/worker-gpu.log" \
  .venv/bin/celery -A tunedeck.celery worker -Q gpu -c 1 -n "gpu@%h" --loglevel INFO
supervise "the dataset worker" "$logs/worker-cpu.log" \
  .venv/bin/celery -A tunedeck.celery worker -Q default -c 1 -n "cpu@%h" --loglevel INFO
# Large dataset files (over TUNEDECK_DATASET_LARGE_BYTES) have a worker of their own, so small uploads never wait.
supervise "the large-dataset worker" "$logs/worker-cpu-large.log" \
  .venv/bin/celery -A tunedeck.celery worker -Q datasets-large -c 1 -n "cpu-large@%h" --loglevel INFO
# Base models pulled from the Hugging Face Hub download on their own queue and worker (no GPU, mostly waiting on
# the network), so a large pull never delays dataset checks or training.
supervise "the download worker" "$logs/worker-downloads.log" \
  .venv/bin/celery -A tunedeck.celery worker -Q downloads -c 1 -n "downloads@%h" --loglevel INFO
# Short generations a user waits for (the compare page's prompt box, a few typed evaluation prompts) have their
# own queue and worker, so they run while a training job holds the gpu worker.
supervise "the interactive worker" "$logs/worker-interactive.log" \
  .venv/bin/celery -A tunedeck.celery worker -Q interactive -c 1 -n "interactive@%h" --loglevel INFO
# The inference server keeps deployed models loaded; the web server's /v1 endpoints proxy to it.
INFERENCE_PORT=${INFERENCE_PORT:-8100}
export TUNEDECK_INFERENCE_URL=${TUNEDECK_INFERENCE_URL:-http://127.0.0.1:$INFERENCE_PORT}
supervise "the inference server" "$logs/inference.log" $py manage.py serve_inference --port "$INFERENCE_PORT"
supervise "the web server" "$logs/web.log" .venv/bin/gunicorn tunedeck.wsgi -b "$HOST:$PORT" --workers 2 \
  --threads 8 --timeout 300 --access-logfile "$logs/access.log"
up=""
for _ in $(seq 1 120); do
  if curl -fs "http://$HOST:$PORT/healthz" >/dev/null 2>&1; then up=1; break; fi
  sleep 0.5
done
if [ -z "$up" ]; then
  echo "!! the web server did not start; the end of $TUNEDECK_DATA_DIR/logs/web.log:" >&2
  tail -20 "$TUNEDECK_DATA_DIR/logs/web.log" >&2
  exit 1
fi
mode=$($py -c 'import tunedeck.settings as s; print(s.ENVIRONMENT + ", DEBUG " + ("on" if s.DEBUG else "off"))')
cat <<MSG

  Tunedeck is running at http://$HOST:$PORT/
  Log in as: $DEMO_USER / $DEMO_PASSWORD
  OpenAI-compatible API of your deployments: http://$HOST:$PORT/v1 (Bearer token from the API tokens page)
  Logs: $TUNEDECK_DATA_DIR/logs/   (Ctrl-C stops the web server, the workers and the inference server)
  Settings: $mode; secrets in $TUNEDECK_DATA_DIR (secret-key, inference-token, mode 0600)

MSG
wait
