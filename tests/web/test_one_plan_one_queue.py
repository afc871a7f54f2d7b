"""One plan per click and one queue position (issue 33).

A job queued from the page or through the API is planned once: the page shows whether the plan fits before it
queues, and passes that same plan on to the job. The real planner runs; a counter is wrapped around it.
The dashboard, the jobs list, the job page, the API and jobs/waiting.py give a queued job the same place in the
gpu queue, where merges and evaluations wait with the training jobs."""
import json
import sys
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs import waiting
from jobs.models import AdapterLine, AdapterVersion, BaseModel, Dataset, Deployment, FineTuneJob, JobStatus
from jobs.services import plans

pytestmark = pytest.mark.django_db

PLAN = {"method": "lora", "rank": 8, "alpha": 16, "micro_batch": 2, "grad_accum": 1, "max_seq_len": 128,
        "learning_rate": 1e-3, "epochs": 1, "memory": {"total_bytes": 2 * 1024**3, "capacity_bytes": 8 * 1024**3}}


def ready_dataset(owner, name="chat.jsonl"):
    return Dataset.objects.create(
        owner=owner, name=name, content_hash=f"{name}-{owner.pk}", file_path="/nonexistent/source",
        status=Dataset.Status.READY, format="jsonl", schema="messages", rows=440, train_rows=400,
        validation_rows=40, token_stats={"min": 8, "p50": 20, "p95": 40, "p99": 40, "max": 48, "mean": 22.0},
    )


@pytest.fixture
def plans_made(monkeypatch):
    """The plans make_plan returned, one per call, wherever it is called from: every module of the project that
    bound the real function by name gets the same counting wrapper around it."""
    real, made = plans.make_plan, []

    def counted(*args, **kwargs):
        plan = real(*args, **kwargs)
        made.append(plan)
        return plan

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("jobs", "tunedeck") and vars(module).get("make_plan") is real:
            monkeypatch.setattr(module, "make_plan", counted)
    return made


def as_stored(plan):
    return json.loads(json.dumps(plan))


def test_a_job_queued_from_the_page_is_planned_once(client, user, tiny_base_model, plans_made):
    dataset = ready_dataset(user)
    client.force_login(user)
    form = {"base_model": tiny_base_model.pk, "dataset": dataset.pk, "method": "lora", "max_steps": "3",
            "adapter_name": "support"}
    response = client.post("/jobs/new/", form)
    assert response.status_code == 302, response.content.decode()[-2000:]
    job = FineTuneJob.objects.get(owner=user)
    assert len(plans_made) == 1, "the page's fit check and the job share one plan"
    assert job.plan == as_stored(plans_made[0]) and job.plan["max_steps"] == 3

    # Ticking "queue it anyway" skips the fit question, not the plan: still one.
    plans_made.clear()
    assert client.post("/jobs/new/", {**form, "confirm_overshoot": "1"}).status_code == 302
    assert len(plans_made) == 1


def test_a_job_queued_through_the_api_is_planned_once(client, user, tiny_base_model, token_for, plans_made):
    dataset = ready_dataset(user)
    response = client.post("/api/v1/jobs", {"dataset": dataset.pk, "method": "lora", "overrides": {"max_steps": 3}},
                           content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token_for(user)}")
    assert response.status_code == 201, response.content
    assert len(plans_made) == 1
    assert FineTuneJob.objects.get(pk=response.json()["id"]).plan == as_stored(plans_made[0])


def _job(owner, base_model, dataset, minutes_ago, status=JobStatus.QUEUED):
    now = timezone.now()
    return FineTuneJob.objects.create(
        owner=owner, base_model=base_model, dataset=dataset, method="lora", plan=PLAN, adapter_name="q",
        status=status, created_at=now - timedelta(minutes=minutes_ago),
        started_at=now - timedelta(minutes=minutes_ago - 5) if status == JobStatus.RUNNING else None)


def _version(owner, base_model, dataset, metrics=None):
    line = AdapterLine.objects.create(owner=owner, name=f"line-{owner.pk}")
    return AdapterVersion.objects.create(owner=owner, line=line, version=1, base_model=base_model, dataset=dataset,
                                         method="lora", path="/nonexistent/adapter", metrics=metrics or {})


def _waiting_evaluation(owner, base_model, dataset, minutes_ago):
    """A version whose full evaluation waits in the gpu queue (the entry evaluation.queue_evaluation writes)."""
    queued_at = (timezone.now() - timedelta(minutes=minutes_ago)).isoformat()
    entry = {"status": "queued", "queued_at": queued_at, "queue": "gpu", "name": "fixed set",
             "prompts": [{"prompt": "hi", "reference": None}]}
    return _version(owner, base_model, dataset, {"evaluation": {"sets": {"s1": entry}, "latest": "s1"}})


def test_the_pages_the_api_and_the_queue_give_one_position(client, user, other_user, token_for):
    base_model = BaseModel.objects.create(owner=None, name="tiny-base", path="/nonexistent", model_type="llama",
                                          architecture="LlamaForCausalLM", sha256="abc", is_default=True)
    mine, theirs = ready_dataset(user), ready_dataset(other_user, "theirs.jsonl")
    _job(other_user, base_model, theirs, 60, JobStatus.RUNNING)  # runs now: no place in the queue
    _job(other_user, base_model, theirs, 40)  # 1
    _waiting_evaluation(user, base_model, mine, 30)  # 2
    second = _job(user, base_model, mine, 20)  # 3
    Deployment.objects.create(owner=other_user, version=_version(other_user, base_model, theirs), name="theirs",
                              status=Deployment.Status.MERGING,
                              revision=1, details={}, updated_at=timezone.now() - timedelta(minutes=10))  # 4
    fifth = _job(user, base_model, mine, 5)  # 5
    expected = {second.pk: 3, fifth.pk: 5}

    assert {pk: waiting.place(waiting.GPU, f"job:{pk}", user)["position"] for pk in expected} == expected
    assert {pk: n for pk, n in waiting.job_positions().items() if pk in expected} == expected
    client.force_login(user)
    for url in ("/", "/jobs/", "/jobs/?status=queued"):
        listed = {job.pk: job.queue_position for job in client.get(url).context["jobs"]}
        assert listed == expected, url
    for pk, position in expected.items():
        page = client.get(f"/jobs/{pk}/")
        assert page.context["queue_position"] == page.context["waiting"]["position"] == position
        assert f"position <b>{position}</b> in the queue" in page.content.decode()
        assert page.context["waiting"]["ahead"] == position - 1
        api = client.get(f"/api/v1/jobs/{pk}", HTTP_AUTHORIZATION=f"Bearer {token_for(user)}").json()
        assert api["queue"]["position"] == position and api["queue"]["ahead"] == position - 1
