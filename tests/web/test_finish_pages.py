"""The pages at a product's finish (issue 23), through the HTTP client: queue places and what each queued thing
waits for, the Workers page busy with evaluations and merges, deploy's "queued (position N)" until its merge
starts, a plan that cannot fit asks for confirmation, confirmed destructive actions with feedback, next steps,
human labels, offline API docs and the smaller fixes. The layout itself is tests/browser/test_pages_layout_browser."""
import json
import re

import pytest
from django.utils import timezone

from jobs import deploy, evaluation, services, waiting
from jobs.models import ApiToken, Dataset, Deployment, FineTuneJob, JobStatus, Worker
from jobs.services import evaluation_runs
from tests.web.test_versions import train_version

pytestmark = pytest.mark.django_db


@pytest.fixture
def dataset(user, tmp_path):
    validation = tmp_path / "validation.jsonl"
    validation.write_text(json.dumps({"messages": [{"role": "user", "content": "ping"},
                                                   {"role": "assistant", "content": "pong"}]}) + "\n")
    return Dataset.objects.create(owner=user, name="support", content_hash="d" * 64, options_hash="o" * 16,
                                  file_path="/unused", status=Dataset.Status.READY, schema="messages", rows=10,
                                  train_rows=8, validation_rows=2, validation_path=str(validation),
                                  token_stats={"p50": 20, "mean": 22, "max": 40})


@pytest.fixture
def version(user, tiny_base_model, dataset, tmp_path):
    return train_version(user, tiny_base_model, dataset, tmp_path, seed=1)


def queued_job(user, dataset, base_model, **fields):
    return FineTuneJob.objects.create(owner=user, base_model=base_model, dataset=dataset, method="lora",
                                      plan={"method": "lora"}, adapter_name="q", **fields)


def test_queue_places_say_what_each_thing_waits_for(user, other_user, tiny_base_model, dataset, version):
    FineTuneJob.objects.filter(pk=version.job_id).update(status=JobStatus.SUCCEEDED)
    running = queued_job(other_user, dataset, tiny_base_model, status=JobStatus.RUNNING,
                         started_at=timezone.now())
    waiting_job = queued_job(user, dataset, tiny_base_model)
    deployment = Deployment.objects.create(owner=user, version=version, name="support", merge=True,
                                           status=Deployment.Status.MERGING, revision=1, details={})
    spot = waiting.place("gpu", f"deployment:{deployment.pk}:1", user)
    assert spot["position"] == 2 and spot["ahead"] == 1, "behind the queued job, after the running one"
    assert spot["waiting_for"] == ["another user's training"], "other users' work is counted, never named"
    assert waiting.place("gpu", f"job:{waiting_job.pk}", user)["position"] == 1
    assert waiting.place("gpu", f"job:{running.pk}", user) is None, "running work has no place in the queue"

    # A prompt typed in the box goes to the interactive queue, where training never is.
    set_id = evaluation.queue_evaluation([version], [{"prompt": "hi", "reference": None}], name="prompt box",
                                         kind="prompt")
    version.refresh_from_db()
    entry = evaluation.entry_of(version, set_id)
    assert entry["queue"] == "interactive"
    spot = waiting.place("interactive", f"evaluation:{set_id}:{entry['queued_at']}", user)
    assert spot["position"] == 1 and spot["waiting_for"] == ["a free worker on the interactive queue"]
    many = [{"prompt": f"p{i}", "reference": None} for i in range(evaluation.INTERACTIVE_MAX_PROMPTS + 1)]
    assert evaluation.queue_for(many, "custom") == "gpu" and evaluation.queue_for(many[:2], "custom") == "interactive"


def test_deploy_says_queued_until_its_merge_starts(client, user, version):
    deployment = Deployment.objects.create(owner=user, version=version, name="support", merge=True,
                                           status=Deployment.Status.MERGING, revision=1, details={})
    client.force_login(user)
    page = client.get(f"/deployments/{deployment.pk}/").content.decode()
    assert "queued (position 1)" in page and "merging the adapter" not in page
    assert "queued (position 1)" in client.get("/deployments/").content.decode()
    token = ApiToken.issue(user)[1]
    api = client.get(f"/api/v1/deployments/{deployment.pk}", HTTP_AUTHORIZATION=f"Bearer {token}").json()
    assert api["status"] == "merging" and api["queue"]["position"] == 1 and api["queue"]["queue"] == "gpu"
    deployment.details = {"merge_started_at": timezone.now().isoformat(), "merge_revision": 1,
                          "merge_worker": "gpu@box"}
    deployment.save()
    page = client.get(f"/deployments/{deployment.pk}/").content.decode()
    assert "merging the adapter" in page and "queued (position" not in page
    # The worker running the merge is busy on the Workers page, not idle.
    Worker.objects.create(hostname="gpu@box", queues="gpu", last_heartbeat=timezone.now(), inventory={})
    workers = client.get("/workers/").content.decode()
    assert "busy" in workers and "the merge of deployment support" in workers and ">idle<" not in workers


def test_workers_page_shows_a_running_evaluation(client, user, version):
    set_id = evaluation.queue_evaluation([version], [{"prompt": "hi", "reference": None}], name="prompt box",
                                         kind="prompt")
    evaluation_runs._update_entry(version.pk, set_id, lambda e: e.update(status="running", worker="interactive@box",
                                                                    started_at=timezone.now().isoformat()))
    Worker.objects.create(hostname="interactive@box", queues="interactive", last_heartbeat=timezone.now(),
                          inventory={})
    client.force_login(user)
    workers = client.get("/workers/").content.decode()
    assert "busy" in workers and "an evaluation of 1 prompt" in workers


def test_stop_is_confirmed_and_the_page_stops_saying_serving(client, user, version):
    deployment = Deployment.objects.create(owner=user, version=version, name="support", merge=False,
                                           status=Deployment.Status.LIVE, revision=1, details={})
    client.force_login(user)
    page = client.get(f"/deployments/{deployment.pk}/").content.decode()
    assert 'id="stop-confirm"' in page and 'class="danger" id="stop-confirm-button"' in page
    assert "--port 8000" not in page, "8000 is Tunedeck's own port"
    commands = json.dumps(deploy.export_commands(deployment))
    assert "--port 8001" not in commands and "--port ${SERVE_PORT:-8001}" in commands, "a port the user sets"
    assert 'id="serve-port-note"' in page and "export SERVE_PORT=" in page
    response = client.post(f"/deployments/{deployment.pk}/stop", {"next": f"/deployments/{deployment.pk}/"},
                           follow=True)
    page = response.content.decode()
    assert "Stopped support" in page and "Not serving" in page and "Serving <a" not in page
    assert 'id="redeploy-button"' in page and 'id="stop-confirm"' not in page


def test_token_revoke_is_confirmed_with_feedback(client, user):
    token, _ = ApiToken.issue(user, name="laptop")
    client.force_login(user)
    page = client.get("/tokens/").content.decode()
    assert "Revoke…" in page and "revoke-confirm-button" in page and 'href="/api/docs"' in page
    page = client.post("/tokens/", {"revoke": str(token.pk)}, follow=True).content.decode()
    assert "Revoked laptop" in page and "get 401" in page and ">revoked</span>" in page
    token.refresh_from_db()
    assert token.revoked_at is not None


def test_a_plan_that_cannot_fit_asks_before_queueing(client, user, tiny_base_model, dataset):
    client.force_login(user)
    form = {"dataset": dataset.pk, "base_model": tiny_base_model.pk, "method": "lora",
            "extra_overrides": '{"device": "cuda"}', "adapter_name": "too-big"}
    preview = client.post("/jobs/plan-preview", form).content.decode()
    assert preview.count("is missing") == 1 and "does not fit in memory" not in preview, "one warning, once"
    assert "GB " not in preview and re.search(r"\d (MiB|GiB)", preview), "binary units, as the estimator counts"
    refused = client.post("/jobs/new/", form)
    assert refused.status_code == 400 and 'name="confirm_overshoot"' in refused.content.decode()
    assert not FineTuneJob.objects.filter(adapter_name="too-big").exists()
    accepted = client.post("/jobs/new/", {**form, "confirm_overshoot": "1"})
    assert accepted.status_code == 302 and FineTuneJob.objects.filter(adapter_name="too-big").exists()


def test_plan_preview_shows_time_overshoot_and_automatic_values(client, user, tiny_base_model, dataset):
    client.force_login(user)
    form = {"dataset": dataset.pk, "base_model": tiny_base_model.pk, "method": "lora", "max_steps": "5"}
    page = client.post("/jobs/plan-preview", form).content.decode()
    assert 'id="plan-time"' in page and "assumed" in page and "tokens/s" in page
    assert 'data-auto-rank="' in page and 'data-auto-micro_batch="' in page
    plan = {"memory": {"total_bytes": 3 * 2**30, "capacity_bytes": 2**30, "breakdown": {"weights": 3 * 2**30}}}
    from jobs.plan_display import memory_bars

    bars = memory_bars(plan)
    assert bars["used_pct"] == 300.0 and bars["over"] and bars["over_bytes"] == 2 * 2**30


def test_job_page_next_steps_and_labels(client, user, tiny_base_model, dataset, version):
    job = version.job
    job.status, job.metrics = JobStatus.SUCCEEDED, {**version.metrics, "final_step_loss": 0.9}
    job.save()
    client.force_login(user)
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert 'id="view-version"' in page and f"View adapter {version.label}" in page and 'id="job-deploy-button"' in page
    assert "Train loss (smoothed over the run)" in page and "Train loss (last step)" in page
    never_started = queued_job(user, dataset, tiny_base_model, status=JobStatus.FAILED, error="x")
    page = client.get(f"/jobs/{never_started.pk}/").content.decode()
    assert "Run again" in page and "Resume from the last checkpoint" not in page


def test_version_page_labels_deploy_first_and_the_evaluation_form_keeps_its_prompts(client, user, version):
    client.force_login(user)
    page = client.get(f"/versions/{version.pk}/").content.decode()
    assert 'id="deploy-name" value="support"' in page and 'class="big" id="deploy-button"' in page
    assert "Validation loss</th>" in page and ">eval_loss<" not in page and "1.0e-03" in page
    response = client.post(f"/versions/{version.pk}/evaluate", {"prompts": "What is it? ||| this",
                                                               "max_new_tokens": "9999"})
    page = response.content.decode()
    assert response.status_code == 400 and "What is it? ||| this</textarea>" in page and "between 1 and" in page


def test_dataset_delete_and_names_without_suffix(client, user, dataset):
    assert services.dataset_name_from_file("support-chats.jsonl.gz") == "support-chats"
    assert services.dataset_name_from_file("data.csv") == "data" and services.dataset_name_from_file(".jsonl")
    client.force_login(user)
    page = client.get(f"/datasets/{dataset.pk}/").content.decode()
    assert 'id="dataset-delete"' in page and "Delete support" in page
    response = client.post(f"/datasets/{dataset.pk}/delete", follow=True)
    assert "deleted" in response.content.decode() and not Dataset.objects.filter(pk=dataset.pk).exists()


def test_api_docs_are_served_without_a_cdn(client, user):
    client.force_login(user)
    page = client.get("/api/docs").content.decode()
    assert "drf_spectacular_sidecar/swagger-ui-dist" in page and "cdn" not in page.lower()
    assert 'href="/api/docs"' in client.get("/").content.decode(), "linked from the navigation"
