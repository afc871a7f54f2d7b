"""Search trials in the REST API and on the job page (issue 20): owner-only, in the schema, and the plan's
search budget is shown before Train is clicked (POST /api/v1/plans and the plan preview)."""
import json

import pytest
from rest_framework.test import APIClient

from jobs.models import Dataset, FineTuneJob, SearchTrial

pytestmark = pytest.mark.django_db


def ready_dataset(owner, rows=4000, validation_rows=400):
    return Dataset.objects.create(
        owner=owner, name="chat.jsonl", content_hash=f"h{rows}", file_path="/nonexistent/source",
        status=Dataset.Status.READY, format="jsonl", schema="messages", rows=rows + validation_rows,
        train_rows=rows, validation_rows=validation_rows,
        token_stats={"min": 8, "p50": 20, "p95": 40, "p99": 40, "max": 48, "mean": 22.0},
    )


def api_for(user, token_for):
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(user)}")
    return api


@pytest.fixture
def searched_job(user, tiny_base_model):
    dataset = ready_dataset(user)
    plan = {"method": "lora", "learning_rate": 4e-4, "search": {"enabled": True, "summary": "Search first: 3 trials"},
            "search_result": {"winner": 1}, "reasons": [("Learning rate 0.0004: best of 3 trials, validation exact "
                                                         "match 0.97 vs 0.85 at 0.0002 (trial 0).")]}
    job = FineTuneJob.objects.create(owner=user, base_model=tiny_base_model, dataset=dataset, method="auto",
                                     plan=plan, adapter_name="a", status="succeeded")
    params = {"rank": 8, "alpha_ratio": 2.0, "target_set": "all-linear", "method": "lora", "micro_batch": 8}
    SearchTrial.objects.create(job=job, number=0, params={**params, "learning_rate": 2e-4}, state="complete",
                               score=0.85, metric="exact_match", curve=[[2, 1.5], [4, 1.2]], duration=3.0)
    SearchTrial.objects.create(job=job, number=1, params={**params, "learning_rate": 4e-4}, state="complete",
                               score=0.97, metric="exact_match", curve=[[2, 1.3], [4, 0.9]], duration=3.0,
                               winner=True)
    SearchTrial.objects.create(job=job, number=2, params={**params, "learning_rate": 3e-3}, state="pruned",
                               metric="exact_match", curve=[[2, 4.0]], duration=1.0,
                               reason="stopped early: validation loss behind the other trials")
    return job


def test_trials_endpoint_lists_every_trial_for_the_owner_only(searched_job, user, other_user, token_for):
    body = api_for(user, token_for).get(f"/api/v1/jobs/{searched_job.pk}/trials").json()
    assert body["job"] == searched_job.pk and body["enabled"] and body["done"] and body["winner"] == 1
    assert [t["state"] for t in body["trials"]] == ["complete", "complete", "pruned"]
    assert body["trials"][1]["winner"] and body["trials"][1]["curve"] == [[2, 1.3], [4, 0.9]]
    assert body["trials"][2]["reason"].startswith("stopped early")
    assert api_for(other_user, token_for).get(f"/api/v1/jobs/{searched_job.pk}/trials").status_code == 404


def test_job_page_shows_the_trials_table_and_chart_for_the_owner_only(searched_job, user, other_user, client):
    client.force_login(user)
    page = client.get(f"/jobs/{searched_job.pk}/").content.decode()
    assert 'id="trials-table"' in page and 'id="trials-chart"' in page and 'id="trial-winner"' in page
    assert "best of 3 trials, validation exact match 0.97 vs 0.85" in page
    data = client.get(f"/jobs/{searched_job.pk}/trials.json").json()
    assert len(data["trials"]) == 3
    client.force_login(other_user)
    assert client.get(f"/jobs/{searched_job.pk}/").status_code == 404
    assert client.get(f"/jobs/{searched_job.pk}/trials").status_code == 404
    assert client.get(f"/jobs/{searched_job.pk}/trials.json").status_code == 404


def test_plan_shows_the_search_budget_before_train(user, tiny_base_model, token_for, client):
    dataset = ready_dataset(user)
    api = api_for(user, token_for)
    plan = api.post("/api/v1/plans", {"dataset": dataset.pk, "base_model": tiny_base_model.pk}, format="json").json()
    search = plan["search"]
    assert search["final_seconds_estimate"] and search["tokens_per_second"] and search["tokens_per_second_source"]
    assert search["summary"] in plan["reasons"] and search["summary"].startswith("Final training about")
    if search["enabled"]:
        assert search["seconds"] == pytest.approx(0.25 * search["final_seconds_estimate"], rel=0.01)
    by_trials = api.post("/api/v1/plans", {"dataset": dataset.pk, "base_model": tiny_base_model.pk,
                                           "overrides": {"search_trials": 6}}, format="json").json()["search"]
    assert by_trials["enabled"] and by_trials["max_trials"] == 6 and "6 trials (set)" in by_trials["summary"]
    skipped = api.post("/api/v1/plans", {"dataset": dataset.pk, "base_model": tiny_base_model.pk,
                                         "overrides": {"search": False}}, format="json").json()
    assert not skipped["search"]["enabled"] and "skipped as asked" in skipped["search"]["summary"]
    assert "search" not in skipped.get("warnings", []) and skipped["learning_rate"]  # the rules still plan
    bad = api.post("/api/v1/plans", {"dataset": dataset.pk, "base_model": tiny_base_model.pk,
                                     "overrides": {"search_minutes": -1}}, format="json")
    assert bad.status_code == 400 and "search_minutes" in bad.json()["error"]["message"]
    client.force_login(user)
    preview = client.post("/jobs/plan-preview", {"dataset": dataset.pk, "base_model": tiny_base_model.pk,
                                                 "method": "auto", "search_trials": "5"}).content.decode()
    assert 'id="plan-search"' in preview and "5 trials (set)" in preview


def test_trials_endpoint_is_in_the_openapi_schema(client):
    paths = json.loads(client.get("/api/schema?format=json").content)["paths"]
    operation = paths["/api/v1/jobs/{id}/trials"]["get"]
    assert {"200", "401", "404"} <= set(operation["responses"])
