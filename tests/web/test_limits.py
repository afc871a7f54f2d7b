"""Limits an operator sets (issue 31): trials and minutes per search (a request over them is a 400 naming the field
and the limit, in the API and on the page; the auto-planned budget is capped), helper workers per search, and
queued jobs per user (running jobs do not count). Through the REST API and the pages; no worker needed."""
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from autotune.search import Budget
from jobs.models import Dataset, FineTuneJob, JobStatus, Worker
from jobs.services import search_stage as job_search

pytestmark = pytest.mark.django_db


def ready_dataset(owner, rows=4000, validation_rows=400, name="chat.jsonl"):
    return Dataset.objects.create(
        owner=owner, name=name, content_hash=f"{name}-{rows}", file_path="/nonexistent/source",
        status=Dataset.Status.READY, format="jsonl", schema="messages", rows=rows + validation_rows,
        train_rows=rows, validation_rows=validation_rows,
        token_stats={"min": 8, "p50": 20, "p95": 40, "p99": 40, "max": 48, "mean": 22.0},
    )


@pytest.fixture
def api(user, tiny_base_model, token_for):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(user)}")
    return client


def assert_limit_error(response, field, limit):
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid" and error["details"] == {"field": field}
    assert field in error["message"] and f"limit of {limit}" in error["message"], error["message"]
    return error["message"]


# ------------------------------------------------------------------------ trials and minutes per search


@pytest.mark.parametrize("field, setting, limit, asked", [("search_trials", "MAX_SEARCH_TRIALS", 8, 9),
                                                          ("search_minutes", "MAX_SEARCH_MINUTES", 30, 30.5)])
def test_a_search_budget_over_the_limit_is_refused_in_the_api(api, user, settings, field, setting, limit, asked):
    setattr(settings, setting, limit)
    dataset = ready_dataset(user)
    over = {"dataset": dataset.pk, "overrides": {field: asked}}
    assert_limit_error(api.post("/api/v1/plans", over, format="json"), field, limit)
    assert_limit_error(api.post("/api/v1/jobs", over, format="json"), field, limit)
    assert not FineTuneJob.objects.exists()
    at_limit = api.post("/api/v1/jobs", {"dataset": dataset.pk, "overrides": {field: limit}}, format="json")
    assert at_limit.status_code == 201, at_limit.content
    clone = api.post(f"/api/v1/jobs/{at_limit.json()['id']}/clone", {"overrides": {field: asked}}, format="json")
    assert_limit_error(clone, field, limit)
    assert FineTuneJob.objects.count() == 1


def test_a_search_budget_over_the_limit_is_refused_on_the_page(client, user, tiny_base_model, settings):
    settings.MAX_SEARCH_TRIALS, settings.MAX_SEARCH_MINUTES = 8, 30
    dataset = ready_dataset(user)
    client.force_login(user)
    form = {"dataset": dataset.pk, "base_model": tiny_base_model.pk, "method": "auto", "adapter_name": "a"}
    for field, value, limit in (("search_trials", "12", "8"), ("search_minutes", "45", "30")):
        page = client.post("/jobs/new/", {**form, field: value})
        assert page.status_code == 400
        text = page.content.decode()
        assert 'id="job-error"' in text and field in text and f"limit of {limit}" in text
        preview = client.post("/jobs/plan-preview", {**form, field: value}).content.decode()
        assert field in preview and f"limit of {limit}" in preview  # said before Train is clicked
    assert not FineTuneJob.objects.exists()
    assert client.post("/jobs/new/", {**form, "search_trials": "8"}).status_code == 302
    assert FineTuneJob.objects.get().plan["search"]["max_trials"] == 8


def test_the_auto_planned_budget_is_capped(api, user, tiny_base_model, settings):
    # A large model makes the default budget (25 % of a long final training) long enough to search.
    tiny_base_model.parameters = 1_000_000_000
    tiny_base_model.save()
    dataset = ready_dataset(user)
    body = {"dataset": dataset.pk, "base_model": tiny_base_model.pk}
    free = api.post("/api/v1/plans", body, format="json").json()["search"]
    assert free["enabled"] and free["set_by"] == "default" and free["seconds"] > 120, free
    assert "Capped" not in free["summary"]

    settings.MAX_SEARCH_MINUTES, settings.MAX_SEARCH_TRIALS = 2, 3
    plan = api.post("/api/v1/plans", body, format="json").json()
    capped = plan["search"]
    assert capped["seconds"] == 120 and capped["max_trials"] == 3 and capped["expected_trials"] <= 3
    assert "Capped by this server's limits: at most 3 trials and 2 minutes per search." in capped["summary"]
    assert capped["summary"] in plan["reasons"]
    assert capped["limits"] == {"max_trials": 3, "max_minutes": 2, "max_helpers": settings.MAX_SEARCH_HELPERS}

    # Trials alone used to have no time bound, and minutes alone no trial bound: both are bounded now.
    job = api.post("/api/v1/jobs", {**body, "overrides": {"search_trials": 2}}, format="json").json()
    budget = Budget.from_plan(FineTuneJob.objects.get(pk=job["id"]).plan["search"])
    assert budget.max_trials == 2 and budget.seconds == 120
    job = api.post("/api/v1/jobs", {**body, "overrides": {"search_minutes": 1}}, format="json").json()
    budget = Budget.from_plan(FineTuneJob.objects.get(pk=job["id"]).plan["search"])
    assert budget.max_trials == 3 and budget.seconds == 60


def test_a_queued_job_planned_again_gets_the_lowered_limit_not_an_error(user, tiny_base_model, settings):
    from jobs import services
    from jobs.services.worker_planning import replan_for_worker

    dataset = ready_dataset(user)
    job = services.create_job(user, tiny_base_model, dataset, "lora", {"search_trials": 6}, "a")
    settings.MAX_SEARCH_TRIALS = 4  # the operator lowers the limit while the job waits
    inventory = {"gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "total_bytes": 80 * 2**30,
                           "free_bytes": 79 * 2**30, "compute_capability": "9.0", "bf16": True}],
                 "cpu": {"cores": 16, "ram_total_bytes": 128 * 2**30, "ram_available_bytes": 120 * 2**30}}
    replan_for_worker(job, inventory, "gpu-worker@elsewhere")
    job.refresh_from_db()
    assert job.plan["hardware"]["worker"] == "gpu-worker@elsewhere" and job.plan["search"]["max_trials"] == 4


# ------------------------------------------------------------------------ helper workers per search


def live_gpu_worker(name, queues="gpu,default"):
    return Worker.objects.create(hostname=name, queues=queues, last_heartbeat=timezone.now())


def test_search_helpers_go_to_at_most_the_limit_of_other_gpu_workers(user, tiny_base_model, settings):
    from tests.conftest import purge_broker

    dataset = ready_dataset(user)
    owner = live_gpu_worker("owner@host")
    for i in range(5):
        live_gpu_worker(f"gpu-{i}@host")
    live_gpu_worker("cpu@host", queues="default")
    Worker.objects.create(hostname="dead@host", queues="gpu", last_heartbeat=timezone.now() - timedelta(hours=1))
    # queued, so a worker that picks a helper message up finds nothing to do
    job = FineTuneJob.objects.create(owner=user, base_model=tiny_base_model, dataset=dataset, method="auto",
                                     adapter_name="a", worker=owner.hostname,
                                     plan={"search": {"enabled": True, "expected_trials": 20, "max_trials": 20}})
    try:
        settings.MAX_SEARCH_HELPERS = 2
        assert job_search.send_helpers(job) == 2  # of 5 other live gpu workers
        settings.MAX_SEARCH_HELPERS = 0
        assert job_search.send_helpers(job) == 0  # the job's own worker only
        settings.MAX_SEARCH_HELPERS = 10
        assert job_search.send_helpers(job) == 5  # never more than there are
        job.plan["search"]["expected_trials"] = 3
        assert job_search.send_helpers(job) == 2  # nor more than the trials need
    finally:
        purge_broker()


def test_the_plan_says_how_many_helper_workers_a_search_may_use(api, user, settings):
    settings.MAX_SEARCH_HELPERS = 1
    dataset = ready_dataset(user)
    plan = api.post("/api/v1/plans", {"dataset": dataset.pk, "overrides": {"search_trials": 4}}, format="json")
    assert plan.json()["search"]["limits"]["max_helpers"] == 1


# ------------------------------------------------------------------------ queued jobs per user


def test_one_job_past_the_queue_limit_is_refused_and_running_jobs_do_not_count(api, user, other_user, token_for,
                                                                               settings):
    settings.MAX_QUEUED_JOBS_PER_USER = 2
    dataset = ready_dataset(user)
    body = {"dataset": dataset.pk, "overrides": {"max_steps": 2}}
    first, second = (api.post("/api/v1/jobs", body, format="json").json() for _ in range(2))
    refused = api.post("/api/v1/jobs", body, format="json")
    assert refused.status_code == 409, refused.content
    error = refused.json()["error"]
    assert error["code"] == "conflict"
    assert "You have 2 jobs queued" in error["message"] and "limit per user is 2" in error["message"]
    assert_conflict(api.post(f"/api/v1/jobs/{first['id']}/clone", {}, format="json"))
    assert FineTuneJob.objects.filter(owner=user).count() == 2

    # another user has a queue of their own
    theirs = APIClient()
    theirs.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(other_user)}")
    other_dataset = ready_dataset(other_user, name="theirs.jsonl")
    assert theirs.post("/api/v1/jobs", {"dataset": other_dataset.pk}, format="json").status_code == 201

    # a worker picks one up: running jobs hold a worker, not a place in the queue
    FineTuneJob.objects.filter(pk=first["id"]).update(status=JobStatus.RUNNING)
    third = api.post("/api/v1/jobs", body, format="json")
    assert third.status_code == 201, third.content

    # a retry queues the job again, so it counts too
    FineTuneJob.objects.filter(pk=first["id"]).update(status=JobStatus.FAILED)
    assert_conflict(api.post(f"/api/v1/jobs/{first['id']}/retry", format="json"))
    assert FineTuneJob.objects.get(pk=first["id"]).status == JobStatus.FAILED
    assert api.post(f"/api/v1/jobs/{second['id']}/cancel", format="json").status_code == 202
    assert api.post(f"/api/v1/jobs/{first['id']}/retry", format="json").status_code == 202


def assert_conflict(response):
    assert response.status_code == 409, response.content
    assert "queued" in response.json()["error"]["message"]


def test_the_queue_limit_on_the_pages(client, user, tiny_base_model, settings):
    settings.MAX_QUEUED_JOBS_PER_USER = 1
    dataset = ready_dataset(user)
    client.force_login(user)
    form = {"dataset": dataset.pk, "base_model": tiny_base_model.pk, "method": "lora", "adapter_name": "a",
            "max_steps": "2"}
    assert client.post("/jobs/new/", form).status_code == 302
    refused = client.post("/jobs/new/", form)
    assert refused.status_code == 400
    assert "You have 1 job queued, this server&#x27;s limit per user is 1" in refused.content.decode()
    assert FineTuneJob.objects.count() == 1

    failed = FineTuneJob.objects.create(owner=user, base_model=tiny_base_model, dataset=dataset, method="lora",
                                        adapter_name="b", plan={"method": "lora"}, status=JobStatus.FAILED)
    page = client.post(f"/jobs/{failed.pk}/retry", follow=True).content.decode()
    assert "You have 1 job queued" in page
    failed.refresh_from_db()
    assert failed.status == JobStatus.FAILED
