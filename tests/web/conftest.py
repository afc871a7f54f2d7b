"""Helpers for the web tests; the fixtures themselves live in tests/conftest.py so every test folder shares them."""
import pytest

from tests.conftest import (  # noqa: F401 - re-exported for `from .conftest import ...` in the tests
    make_base_model,
    purge_broker,
    start_worker,
    stop_worker,
    wait_for,
    wait_for_worker_row,
)


@pytest.fixture(autouse=True)
def fresh_rate_limits():
    """The rate limits' counters (login 10/min per address, inference per token) live in the cache, which the live
    server shares with the tests: cleared before each test, so a fast machine's many logins in one minute, from
    tests that each log in once, never answer 429."""
    from django.core.cache import cache

    cache.clear()
    yield
