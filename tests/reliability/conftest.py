"""Fixtures for the fault tests: a private Redis broker per test (so a test may restart it, and no message of
another run is ever delivered here), the tiny base model, a ready dataset, and cleanup of every process started."""
import pytest

from helpers import PrivateRedis, kill_worker, make_ready_dataset


@pytest.fixture
def private_redis(tmp_path):
    redis = PrivateRedis(tmp_path / "redis").start()
    yield redis
    redis.stop()


@pytest.fixture
def workers():
    """Collects the worker processes a test starts; every one is killed at the end, whatever happened."""
    started = []
    yield started
    for proc in started:
        kill_worker(proc)


@pytest.fixture
def dataset(user, tiny_base_model):
    return make_ready_dataset(user)
