"""The API's one error format on every kind of failure, and the API actions that mirror the pages
(tokens, dataset delete, job clone), through Django's test client (no worker needed)."""
import json

import pytest
from django.core.cache import cache
from rest_framework.test import APIClient

from jobs.models import ApiToken, Dataset, FineTuneJob

pytestmark = pytest.mark.django_db

BIG = 2**70


@pytest.fixture(autouse=True)
def clear_throttle_cache():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def client(user, tiny_base_model, token_for):
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(user)}")
    return api


def ready_dataset(owner, name="chat.jsonl", content_hash="abc"):
    return Dataset.objects.create(
        owner=owner, name=name, content_hash=content_hash, file_path=f"/nonexistent/{content_hash}/source",
        status=Dataset.Status.READY, format="jsonl", schema="messages", rows=40, train_rows=36,
        validation_rows=4, token_stats={"min": 8, "p50": 20, "p95": 40, "p99": 40, "max": 48},
    )


def assert_error(response, status, code=None):
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = json.loads(response.content)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


def test_unknown_paths_and_methods(client):
    assert_error(client.get("/api/v1/no-such-thing"), 404, "not_found")
    assert_error(client.get("/api/v1/no-such-thing/"), 404, "not_found")  # a trailing slash is forgiven (issue 37), not invented
    assert_error(client.post("/api/v2/jobs", {}, format="json"), 404, "not_found")
    assert_error(client.delete("/api/v1/jobs"), 405, "method_not_allowed")
    assert_error(client.put("/api/v1/plans", {}, format="json"), 405, "method_not_allowed")


def test_authentication_errors(db, tiny_base_model):
    anonymous = APIClient()
    error = assert_error(anonymous.get("/api/v1/jobs"), 401, "not_authenticated")
    assert "credentials" in error["message"].lower()
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Bearer td_not-a-real-token")
    response = bad.get("/api/v1/datasets")
    assert_error(response, 401, "authentication_failed")
    assert response["WWW-Authenticate"] == "Bearer"
    malformed = APIClient()
    malformed.credentials(HTTP_AUTHORIZATION="Bearer two words")
    assert_error(malformed.get("/api/v1/datasets"), 401, "authentication_failed")


def test_login_errors_and_throttling(user):
    anonymous = APIClient()
    assert_error(anonymous.post("/api/v1/auth/token", {"username": "alice", "password": "nope"}, format="json"),
                 401, "invalid_credentials")
    error = assert_error(anonymous.post("/api/v1/auth/token", {"username": "alice"}, format="json"), 400, "invalid")
    assert error["message"].startswith("password:")
    ok = anonymous.post("/api/v1/auth/token", {"username": "alice", "password": "alice-pw", "name": "ci"},
                        format="json")
    assert ok.status_code == 200 and ok.json()["token"].startswith("td_")
    assert ApiToken.objects.filter(user=user, name="ci").exists()
    for _ in range(25):
        response = anonymous.post("/api/v1/auth/token", {"username": "alice", "password": "x"}, format="json")
        if response.status_code == 429:
            break
    error = assert_error(response, 429, "throttled")
    assert error["details"]["retry_after"] > 0 and response["Retry-After"]


def test_parse_and_media_type_errors(client):
    bad_json = client.post("/api/v1/plans", data="{not json", content_type="application/json")
    assert_error(bad_json, 400, "parse_error")
    form = client.post("/api/v1/plans", data="method=lora", content_type="text/plain")
    assert_error(form, 415, "unsupported_media_type")
    not_object = client.post("/api/v1/jobs", data="[1, 2]", content_type="application/json")
    assert_error(not_object, 400, "invalid")


def test_validation_errors_name_the_field(client, user):
    dataset = ready_dataset(user)
    error = assert_error(client.post("/api/v1/plans", {"dataset": dataset.pk, "method": "magic"}, format="json"),
                         400, "invalid")
    assert "magic" in error["message"] and error["details"] == {"field": "method"}
    error = assert_error(client.post("/api/v1/plans", {"overrides": {"rank": "lots"}}, format="json"), 400)
    assert "rank" in error["message"]
    error = assert_error(client.post("/api/v1/plans", {"overrides": {"early_stopping_metric": "accuracy"}},
                                     format="json"), 400)
    assert error["message"] == "Override 'early_stopping_metric' must be one of auto, eval_loss, exact_match, not " \
                               "'accuracy'." and error["details"] == {"field": "overrides"}
    error = assert_error(client.post("/api/v1/plans", {"gpu": {"gpus": "many"}}, format="json"), 400)
    assert error["message"].startswith("gpu:")
    error = assert_error(client.post("/api/v1/plans", {"gpu": {"gpus": [{"free_bytes": 1e300}]}}, format="json"),
                         400)
    assert_error(client.get("/api/v1/jobs?status=sideways"), 400, "invalid")
    assert_error(client.get("/api/v1/adapter-versions/compare?ids=a,b"), 400, "invalid")
    assert_error(client.get("/api/v1/adapter-versions/compare"), 400, "invalid")


def test_unknown_huge_and_other_users_ids_are_404(client, user, other_user):
    theirs = ready_dataset(other_user, content_hash="theirs")
    for path in (f"/api/v1/datasets/{theirs.pk}", f"/api/v1/datasets/{BIG}", f"/api/v1/jobs/{BIG}",
                 f"/api/v1/adapter-versions/{BIG}", f"/api/v1/adapter-versions/{BIG}/download",
                 f"/api/v1/base-models/{BIG}", f"/api/v1/deployments/{BIG}", f"/api/v1/tokens/{BIG}",
                 f"/api/v1/jobs/{BIG}/metrics"):
        assert_error(client.get(path), 404, "not_found")
    assert_error(client.post("/api/v1/plans", {"dataset": BIG}, format="json"), 404, "not_found")
    assert_error(client.post("/api/v1/plans", {"dataset": theirs.pk}, format="json"), 404, "not_found")
    assert_error(client.post("/api/v1/jobs", {"dataset": theirs.pk}, format="json"), 404, "not_found")
    assert_error(client.post(f"/api/v1/jobs/{BIG}/cancel"), 404, "not_found")
    assert_error(client.get(f"/api/v1/adapter-versions/compare?ids={BIG}"), 400, "invalid")
    assert_error(client.get("/api/v1/datasets?page=99"), 404, "not_found")
    assert_error(client.delete(f"/api/v1/datasets/{theirs.pk}"), 404, "not_found")
    assert Dataset.objects.filter(pk=theirs.pk).exists()


def test_unexpected_errors_are_500_in_the_error_format(client, monkeypatch):
    from jobs import services

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(services, "make_plan", boom)
    error = assert_error(client.post("/api/v1/plans", {}, format="json"), 500, "server_error")
    assert "boom" not in error["message"]


def test_lists_are_paginated(client, user):
    for i in range(3):
        ready_dataset(user, name=f"d{i}", content_hash=f"h{i}")
    page = client.get("/api/v1/datasets?page_size=2").json()
    assert page["count"] == 3 and len(page["results"]) == 2 and page["next"] and page["previous"] is None
    second = client.get("/api/v1/datasets?page_size=2&page=2").json()
    assert len(second["results"]) == 1
    for path in ("/api/v1/base-models", "/api/v1/jobs", "/api/v1/adapter-versions", "/api/v1/workers",
                 "/api/v1/tokens"):
        assert {"count", "next", "previous", "results"} <= set(client.get(path).json()), path


def test_tokens_listed_by_prefix_created_and_revoked(client, user):
    created = client.post("/api/v1/tokens", {"name": "ci"}, format="json")
    assert created.status_code == 201, created.content
    raw = created.json()["token"]
    assert raw.startswith(created.json()["prefix"]) and created.json()["active"] is True
    listing = client.get("/api/v1/tokens").json()["results"]
    assert {t["name"] for t in listing} == {"token", "ci"}
    text = json.dumps(listing)
    assert raw not in text and "hash" not in text and all(set(t) >= {"id", "prefix", "last_used_at"} for t in listing)

    other = APIClient()
    other.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert other.get("/api/v1/jobs").status_code == 200
    assert client.delete(f"/api/v1/tokens/{created.json()['id']}").status_code == 204
    assert_error(other.get("/api/v1/jobs"), 401, "authentication_failed")
    assert client.get(f"/api/v1/tokens/{created.json()['id']}").json()["active"] is False
    assert client.delete(f"/api/v1/tokens/{created.json()['id']}").status_code == 204  # idempotent


def test_tokens_of_another_user_are_404(client, other_user):
    theirs, _ = ApiToken.issue(other_user)
    assert_error(client.delete(f"/api/v1/tokens/{theirs.pk}"), 404, "not_found")
    assert ApiToken.objects.get(pk=theirs.pk).revoked_at is None


def test_dataset_delete(client, user, tiny_base_model, tmp_path, settings):
    settings.DATASET_DIR = tmp_path
    folder = tmp_path / "user-1" / "abc-def"
    (folder / "processed-1").mkdir(parents=True)
    (folder / "source").write_text("{}\n")
    dataset = ready_dataset(user)
    dataset.file_path = str(folder / "source")
    dataset.save()
    (folder / f"processed-{dataset.pk}").mkdir()

    used = ready_dataset(user, content_hash="used")
    job = client.post("/api/v1/jobs", {"dataset": used.pk, "overrides": {"max_steps": 2}}, format="json")
    assert job.status_code == 201, job.content
    error = assert_error(client.delete(f"/api/v1/datasets/{used.pk}"), 409, "conflict")
    assert "job" in error["message"]

    assert client.delete(f"/api/v1/datasets/{dataset.pk}").status_code == 204
    assert not Dataset.objects.filter(pk=dataset.pk).exists() and not folder.exists()
    assert_error(client.get(f"/api/v1/datasets/{dataset.pk}"), 404, "not_found")


def test_job_clone_copies_settings_and_applies_changes(client, user):
    dataset = ready_dataset(user)
    first = client.post("/api/v1/jobs", {"dataset": dataset.pk, "method": "lora", "adapter_name": "greeter",
                                         "overrides": {"max_steps": 3, "rank": 4}}, format="json").json()
    clone = client.post(f"/api/v1/jobs/{first['id']}/clone", {"overrides": {"rank": 8, "max_steps": None}},
                        format="json")
    assert clone.status_code == 201, clone.content
    job = clone.json()
    assert job["id"] != first["id"] and job["adapter_name"] == "greeter" and job["method"] == "lora"
    assert job["overrides"] == {"rank": 8} and job["plan"]["rank"] == 8 and job["dataset"] == dataset.pk
    plain = client.post(f"/api/v1/jobs/{first['id']}/clone", format="json")
    assert plain.status_code == 201 and plain.json()["overrides"] == {"max_steps": 3, "rank": 4}
    assert FineTuneJob.objects.filter(owner=user).count() == 3
    assert_error(client.post(f"/api/v1/jobs/{first['id']}/clone", {"method": "dpo"}, format="json"), 400)


def test_schema_lists_error_responses(client):
    response = client.get("/api/schema?format=json")
    assert response.status_code == 200
    schema = json.loads(response.content)
    paths = schema["paths"]
    for route in ("/api/v1/tokens", "/api/v1/tokens/{id}", "/api/v1/jobs/{id}/clone"):
        assert route in paths
    assert "delete" in paths["/api/v1/datasets/{id}"]
    upload = paths["/api/v1/datasets"]["post"]
    assert list(upload["requestBody"]["content"]) == ["multipart/form-data"]
    assert {"200", "201", "400", "401", "413"} <= set(upload["responses"])
    download = paths["/api/v1/adapter-versions/{id}/download"]["get"]
    assert "application/zip" in download["responses"]["200"]["content"]
    assert download["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    assert "429" in paths["/api/v1/auth/token"]["post"]["responses"]


def test_a_trailing_slash_answers_like_the_path_without_it(client, user):
    """Issue 37: /api/v1/datasets/ was a 404; it answers as /api/v1/datasets (no redirect that would drop a body)."""
    ready_dataset(user)
    plain, slashed = client.get("/api/v1/datasets"), client.get("/api/v1/datasets/")
    assert slashed.status_code == 200 and slashed.json() == plain.json()
    assert client.get("/api/v1/no-such-thing/").status_code == 404
