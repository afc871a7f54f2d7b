"""Shared fixtures: the tiny models, users, and a real Celery worker process that talks to the same PostgreSQL
test database and Redis broker as the tests (session-wide, for tests/web, tests/browser and tests/reliability)."""
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ROOT = TESTS.parent
sys.path.append(str(TESTS))  # after the project, so tests/finetune never shadows finetune/

import helpers  # noqa: E402
from helpers import wait_for  # noqa: E402, F401  (re-exported: tests import it from conftest)


def pytest_report_header(config):
    """Which CPU path bitsandbytes takes here: the 4-bit tests exercise both, but a reader of CI's log should see
    which one this machine would take on its own."""
    from finetune.fourbit import cpu_kernel_path

    return f"bitsandbytes 4-bit CPU path on this machine: {cpu_kernel_path()}"


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need CUDA: skipped here (CI has none), run through the device tool on an H100."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a real BPE tokenizer and ChatML template, built once per test session."""
    from tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    from tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2")



@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("alice", password="alice-pw")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user("bob", password="bob-pw")


def make_base_model(path, name="tiny-llama", default=True):
    from jobs.models import BaseModel

    config = json.loads((Path(path) / "config.json").read_text())
    return BaseModel.objects.create(
        owner=None, name=name, path=str(path), architecture=config["architectures"][0],
        model_type=config["model_type"], parameters=100_000, config=config, is_default=default,
        has_chat_template=True, sha256="tiny",
    )


@pytest.fixture
def tiny_base_model(db, tiny_model_dir):
    return make_base_model(tiny_model_dir)


@pytest.fixture
def token_for():
    from jobs.models import ApiToken

    def issue(user):
        return ApiToken.issue(user)[1]

    return issue


def start_worker(name, log_path, queues="gpu,default,datasets-large,interactive,downloads", extra_env=None):
    """The session's worker: every queue and the normal lease (the reliability tests use a fast one)."""
    return helpers.start_worker(name, log_path, queues, lease={}, extra_env=extra_env)


def wait_for_worker_row(name, proc, timeout=90):
    from jobs.models import Worker

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early:\n{Path(proc.log_path).read_text()[-3000:]}")
        if Worker.objects.filter(hostname__startswith=f"{name}@").exists():
            return
        time.sleep(0.5)
    raise AssertionError(f"worker did not report in {timeout}s:\n{Path(proc.log_path).read_text()[-3000:]}")


def stop_worker(proc, timeout=20):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def purge_broker():
    from tunedeck.celery import app

    with app.connection_for_write() as conn:
        for queue in ("gpu", "default", "datasets-large", "interactive", "downloads"):
            try:
                conn.default_channel.queue_purge(queue)
            except Exception:  # noqa: BLE001 - a queue that does not exist yet has nothing to purge
                pass


@pytest.fixture(scope="session")
def worker_log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, django_db_blocker, worker_log_dir):
    """One real Celery worker process for the session, consuming every queue."""
    with django_db_blocker.unblock():
        purge_broker()
        name = f"test-{uuid.uuid4().hex[:6]}"
        proc = start_worker(name, worker_log_dir / f"{name}.log")
        try:
            wait_for_worker_row(name, proc)
        except AssertionError:
            stop_worker(proc)
            raise
    yield proc
    stop_worker(proc)




@pytest.fixture(scope="session")
def _shared_inference_server_ends():
    yield
    helpers.stop_shared_inference_server()


@pytest.fixture
def inference_server(_shared_inference_server_ends, django_db_setup, django_db_blocker, tmp_path_factory):
    """A real `manage.py serve_inference` process on a free port, reading the test database, shared by the tests
    that use it (it keeps at most 2 adapters per base loaded). It serves every deployment in that database, so a
    test that runs an inference service of its own stops it first (`no_shared_inference_server`); the next test
    that needs it starts it again."""
    from django.conf import settings

    with django_db_blocker.unblock():
        database_url = helpers.worker_database_url()
    return helpers.shared_inference_server(database_url, settings.CELERY_BROKER_URL, settings.DATA_DIR,
                                           lambda: tmp_path_factory.mktemp("inference-logs"))


@pytest.fixture
def no_shared_inference_server():
    """For a test that runs an inference service in its own process: the shared one would also serve (and write
    the engine notes of) the deployments the test makes."""
    helpers.stop_shared_inference_server()
