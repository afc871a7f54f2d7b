"""Helpers for tests that run real processes: Celery workers against any database/broker, private Redis and
PostgreSQL servers that a test may stop and restart, a web server subprocess, and ready-made datasets and jobs.

The shared PostgreSQL and Redis are used by other test runs at the same time: a test that restarts a server
starts its own (PrivateRedis, PrivatePostgres) and points the processes it starts at it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def _postgres_bin() -> Path:
    """The server binaries of the newest installed Debian PostgreSQL (initdb and pg_ctl are not on PATH)."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return versions[-1] if versions else Path("/usr/lib/postgresql/bin")


PG_BIN = _postgres_bin()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=240, interval=0.5, what="condition", log_proc=None):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    tail = ""
    for proc in log_proc if isinstance(log_proc, (list, tuple)) else [log_proc]:
        if proc is not None and getattr(proc, "log_path", None):
            tail += f"\n--- {proc.log_path}:\n" + Path(proc.log_path).read_text(errors="replace")[-4000:]
    raise AssertionError(f"timed out waiting for {what} (last: {last!r}){tail}")


def worker_database_url() -> str:
    from django.db import connection

    db = connection.settings_dict
    assert "postgresql" in db["ENGINE"], (
        "worker tests need PostgreSQL: run them through scripts/test.sh, which sets DATABASE_URL "
        "(a separate worker process cannot see an in-memory SQLite test database)")
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


# ------------------------------------------------------------------------------------------ workers

FAST_LEASE = {"TUNEDECK_HEARTBEAT_SECONDS": "1", "TUNEDECK_LEASE_SECONDS": "5"}


def start_worker(name, log_path, queues="gpu", *, database_url=None, broker_url=None, lease=FAST_LEASE,
                 extra_env=None):
    """A real `celery worker` process (concurrency 1) in its own process group, so a test can SIGKILL all of it."""
    from django.conf import settings

    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url or worker_database_url(),
        CELERY_BROKER_URL=broker_url or settings.CELERY_BROKER_URL,
        TUNEDECK_DATA_DIR=str(settings.DATA_DIR),
        PYTHONUNBUFFERED="1",
        **lease,
    )
    env.update(extra_env or {})
    celery = str(Path(sys.executable).with_name("celery"))
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [celery, "-A", "tunedeck.celery", "worker", "-Q", queues, "-c", "1", "-n", f"{name}@%h",
         "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    proc.log_path = log_path
    proc.worker_name = name
    return proc


def worker_log(proc) -> str:
    return Path(proc.log_path).read_text(errors="replace")


def wait_for_worker_ready(proc, timeout=90):
    """Waits for the worker's 'ready' line (its consumer is connected and its heartbeat thread started)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early:\n{worker_log(proc)[-3000:]}")
        if " ready." in worker_log(proc):
            return
        time.sleep(0.3)
    raise AssertionError(f"worker not ready in {timeout}s:\n{worker_log(proc)[-3000:]}")


def stop_worker(proc, timeout=20):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_worker(proc)
    _reap_group(proc)


def kill_worker(proc):
    """SIGKILL to the whole worker (main process and pool child), as a machine crash or the OOM killer would."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    _reap_group(proc)


def _reap_group(proc):
    # The pool child may outlive the main process by a moment; nothing of this worker may linger.
    for _ in range(50):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------ private servers


class PrivateRedis:
    """A redis-server of this test's own, without persistence (a restart empties it, like a crashed broker)."""

    def __init__(self, folder, port=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.restarts = 0

    def start(self):
        log = open(self.folder / "redis.log", "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.folder)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for(self.ping, timeout=20, interval=0.1, what=f"redis on port {self.port}")
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down_seconds=2.0):
        self.stop()
        time.sleep(down_seconds)
        self.start()
        self.restarts += 1


class PrivatePostgres:
    """A PostgreSQL 15 cluster of this test's own (initdb into a temporary folder), which the test may restart."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="tunedeck-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        self.as_postgres = os.geteuid() == 0  # PostgreSQL refuses to run as root
        self.restarts = 0

    def _run(self, *args, check=True):
        cmd = [str(a) for a in args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def init(self):
        if not (PG_BIN / "initdb").exists():
            import pytest

            pytest.skip(f"PostgreSQL server binaries are not at {PG_BIN}")
        os.chmod(self.folder, 0o755)
        if self.as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(PG_BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        return self

    def start(self):
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60",
                  "-o", f"-p {self.port} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        return self

    def stop(self, mode="fast"):
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def restart(self, down_seconds=2.0):
        self.stop()
        time.sleep(down_seconds)
        self.start()
        self.restarts += 1

    def destroy(self):
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


# The inference server the deploy tests share: one `manage.py serve_inference` process reading the test database.
SHARED_INFERENCE_SERVER: dict = {}


def shared_inference_server(database_url: str, broker_url: str, data_dir, log_dir) -> str:
    """Its URL, started first when it is not running (`log_dir()` names the folder for a new one's log)."""
    proc = SHARED_INFERENCE_SERVER.get("proc")
    if proc is not None and proc.poll() is None:
        return SHARED_INFERENCE_SERVER["url"]
    port = free_port()
    env = dict(os.environ, DATABASE_URL=database_url, CELERY_BROKER_URL=broker_url, TUNEDECK_DATA_DIR=str(data_dir),
               PYTHONUNBUFFERED="1")
    command = [sys.executable, "manage.py", "serve_inference", "--port", str(port), "--device", "cpu", "--poll",
               "0.5", "--max-adapters", "2"]
    # It imports torch, transformers and peft before listening.
    proc = _start_http(command, port, env, log_dir() / "inference.log", "the inference server", health="/health",
                       timeout=180)
    SHARED_INFERENCE_SERVER.update(proc=proc, url=f"http://127.0.0.1:{port}")
    return SHARED_INFERENCE_SERVER["url"]


def stop_shared_inference_server() -> None:
    proc = SHARED_INFERENCE_SERVER.pop("proc", None)
    SHARED_INFERENCE_SERVER.clear()
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def django_env(database_url, broker_url=None, **extra) -> dict:
    from django.conf import settings

    env = dict(os.environ)
    env.update(DATABASE_URL=database_url, TUNEDECK_DATA_DIR=str(settings.DATA_DIR), PYTHONUNBUFFERED="1",
               CELERY_BROKER_URL=broker_url or settings.CELERY_BROKER_URL, **FAST_LEASE)
    env.pop("TUNEDECK_TEST_DB_NAME", None)
    env.update(extra)
    return env


def manage(*args, env, timeout=300):
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=True)


def run_python(code: str, env, timeout=300):
    """Runs a Python snippet with Django set up against env's database; returns the JSON it prints last."""
    prelude = ("import os, sys, json, django\n"
               f"sys.path[:0] = [{str(ROOT)!r}, {str(TESTS)!r}]\n"
               "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tunedeck.settings')\n"
               "django.setup()\n")
    done = subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"helper script failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_web_server(port, env, log_path):
    """`manage.py runserver` (threaded, no autoreload) as a separate web process."""
    return _start_http([sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
                       port, env, log_path, "web server")


def start_gunicorn(port, env, log_path, workers=2, threads=8):
    """The production WSGI server: a bounded pool of threads, hence of database connections."""
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    return _start_http([gunicorn, "tunedeck.wsgi", "-b", f"127.0.0.1:{port}", "-w", str(workers),
                        "--threads", str(threads), "--timeout", "120"], port, env, log_path, "gunicorn")


def _start_http(command, port, env, log_path, what, health="/healthz", timeout=60):
    """Starts an HTTP server process and waits until its health URL answers; one that does not is ended."""
    import requests

    log = open(log_path, "ab")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log_path = log_path

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited:\n{Path(log_path).read_text()[-3000:]}")
        try:
            return requests.get(f"http://127.0.0.1:{port}{health}", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(up, timeout=timeout, interval=0.3, what=what)
    except AssertionError:
        proc.kill()
        proc.wait()
        _reap_group(proc)
        raise
    return proc


# ------------------------------------------------------------------------------------------ data and jobs

TRAIN_OVERRIDES = {"micro_batch": 4, "grad_accum": 1, "max_seq_len": 64, "learning_rate": 3e-3,
                   "max_eval_generations": 0, "eval_every_steps": 100000}


def make_ready_dataset(user, rows=None, name="chat.jsonl"):
    """A dataset processed in this process (no worker and no broker message), ready to train on."""
    from django.conf import settings
    from tinymodel import learnable_chat_rows

    from jobs import services
    from jobs.models import Dataset
    from jobs.services.dataset_processing import process_dataset

    rows = rows if rows is not None else learnable_chat_rows(48)
    payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
    folder = Path(settings.DATASET_DIR) / f"user-{user.pk}" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    (folder / "source").write_bytes(payload)
    dataset = Dataset.objects.create(
        owner=user, name=name, original_filename=name, content_hash=uuid.uuid4().hex, options_hash="test",
        file_path=str(folder / "source"), size_bytes=len(payload), validation_fraction=0.2,
        base_model=services.default_base_model(),
    )
    process_dataset(dataset.pk)
    dataset.refresh_from_db()
    assert dataset.status == Dataset.Status.READY, dataset.error
    return dataset


def make_job(user, dataset, base_model=None, enqueue=False, **overrides):
    """A queued job as services.create_job makes it, without sending its message unless asked (tests that use a
    private broker send it themselves with send_train)."""
    from jobs import services
    from jobs.models import FineTuneJob, JobEvent

    base_model = base_model or services.default_base_model()
    overrides = {**TRAIN_OVERRIDES, **overrides}
    if enqueue:
        return services.create_job(user, base_model, dataset, "lora", overrides, "reliability")
    plan = services.make_plan(base_model, dataset, "lora", overrides)
    job = FineTuneJob.objects.create(owner=user, base_model=base_model, dataset=dataset, method="lora",
                                     overrides=services.clean_overrides(overrides), plan=plan,
                                     adapter_name="reliability")
    JobEvent.objects.create(job=job, kind="queued", message="Queued for a worker.")
    return job


def send_train(job_id, broker_url):
    """Sends the train_job message for a job to the given broker (the task routes put it on the gpu queue)."""
    from jobs.tasks import train_job
    from tunedeck.celery import app

    with app.connection_for_write(url=broker_url) as conn:
        train_job.apply_async(args=[job_id], connection=conn)


def events(job_id, kind=None):
    from jobs.models import JobEvent

    qs = JobEvent.objects.filter(job_id=job_id).order_by("created_at", "id")
    return list(qs.filter(kind=kind) if kind else qs)


def job_state(job_id):
    from jobs.models import FineTuneJob

    return FineTuneJob.objects.get(pk=job_id)
