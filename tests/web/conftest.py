"""Helpers for the web tests; the fixtures themselves live in tests/conftest.py so every test folder shares them."""
from tests.conftest import (  # noqa: F401 - re-exported for `from .conftest import ...` in the tests
    make_base_model,
    purge_broker,
    start_worker,
    stop_worker,
    wait_for,
    wait_for_worker_row,
)
