"""Property-based run of the whole /api/v1 against its own OpenAPI schema (schemathesis, in-process WSGI):
for every operation, generated requests (valid and invalid) never get a 500, and every response matches what the
schema says: its status is documented, its body validates against the documented shape, its content type too.
("Schema-valid input accepted" is left out: see the test.) Bounded: a few examples per operation, well under a minute in all."""
from contextlib import contextmanager

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from jobs.models import AdapterLine, AdapterVersion, Dataset, FineTuneJob

pytestmark = pytest.mark.django_db


def load_schema():
    from tunedeck.wsgi import application

    with kept_connections():
        schema = schemathesis.openapi.from_wsgi("/api/schema?format=json", application)
    # Revoking tokens would revoke the one this run authenticates with (ids are small and get guessed).
    return schema.exclude(path_regex=r"^/api/v1/tokens/\{id\}$", method="DELETE")


@contextmanager
def kept_connections():
    """As Django's test client does around each request: the WSGI request must not close the test's database
    connection (and with it the test's transaction). Django's test client reconnects the handler after each of its
    requests, so this is done again for every test, not once."""
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


schema = load_schema()


@pytest.fixture
def bearer(user, tiny_base_model, token_for, tmp_path):
    """alice, with a few objects whose small ids the generated requests will hit now and then."""
    dataset = Dataset.objects.create(owner=user, name="d.jsonl", content_hash="d", file_path=str(tmp_path / "s"),
                                     status=Dataset.Status.READY, format="jsonl", schema="messages", rows=40,
                                     train_rows=36, validation_rows=4,
                                     token_stats={"min": 8, "p50": 20, "p95": 40, "p99": 40, "max": 48})
    job = FineTuneJob.objects.create(owner=user, base_model=tiny_base_model, dataset=dataset, method="lora",
                                     plan={"method": "lora"}, adapter_name="d", status="succeeded")
    line = AdapterLine.objects.create(owner=user, name="d")
    AdapterVersion.objects.create(owner=user, line=line, version=1, job=job, base_model=tiny_base_model,
                                  dataset=dataset, method="lora", path=str(tmp_path / "missing"))
    return {"Authorization": f"Bearer {token_for(user)}"}


@pytest.fixture(autouse=True)
def no_throttle_carry_over():
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@schema.parametrize()
@settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_matches_its_schema(case, bearer):
    with kept_connections():
        check(case, bearer)


def check(case, bearer):
    # Every default check (no 5xx; status, content type, headers and body as documented; invalid input refused)
    # except "schema-valid input accepted": some rules are not expressible in OpenAPI (a multipart field that
    # must be a file part, an id that must name one of your objects), and those answer with a documented 4xx.
    case.call_and_validate(headers=bearer, excluded_checks=[positive_data_acceptance])
