"""The train page sets the world size and how many workers it spans (issue 36), as the API's overrides do."""
import pytest

from jobs.models import FineTuneJob

from .test_one_plan_one_queue import ready_dataset

pytestmark = pytest.mark.django_db


def test_the_train_page_has_gpus_and_workers_fields(client, user):
    client.force_login(user)
    page = client.get("/jobs/new/").content.decode()
    assert 'name="gpus"' in page and 'name="nodes"' in page


def test_gpus_and_workers_from_the_page_reach_the_job_plan(client, user, tiny_base_model):
    dataset = ready_dataset(user)
    client.force_login(user)
    form = {"base_model": tiny_base_model.pk, "dataset": dataset.pk, "method": "lora", "max_steps": "3",
            "adapter_name": "spread", "gpus": "2", "nodes": "2", "micro_batch": "2", "grad_accum": "2",
            "confirm_overshoot": "1"}
    response = client.post("/jobs/new/", form)
    assert response.status_code == 302, response.content.decode()[-2000:]
    plan = FineTuneJob.objects.get(owner=user).plan
    assert (plan["gpus"], plan["nodes"]) == (2, 2), plan
    assert plan["global_batch"] == plan["micro_batch"] * plan["grad_accum"] * 2


def test_a_workers_count_that_is_not_a_number_is_named(client, user, tiny_base_model):
    dataset = ready_dataset(user)
    client.force_login(user)
    form = {"base_model": tiny_base_model.pk, "dataset": dataset.pk, "method": "lora", "adapter_name": "spread",
            "nodes": "two"}
    response = client.post("/jobs/new/", form)
    assert response.status_code == 400, response.status_code
    assert not FineTuneJob.objects.filter(owner=user).exists()
    assert "nodes" in response.content.decode() and 'value="two"' in response.content.decode()
