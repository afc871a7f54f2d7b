"""Helpers for the web tests; the fixtures themselves live in tests/conftest.py so every test folder shares them."""
import pytest
import requests

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


def api_session(live_server, username="alice", password="alice-pw") -> requests.Session:
    """A requests session on the live server's REST API with the user's bearer token; session.base is the API root."""
    session = requests.Session()
    response = session.post(f"{live_server.url}/api/v1/auth/token", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    session.headers["Authorization"] = f"Bearer {response.json()['token']}"
    session.base = f"{live_server.url}/api/v1"
    return session
