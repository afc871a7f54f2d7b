"""ORPO end to end, like any other method (issue 33's worked example of adding one): the registry lists it on the
train page and in the API schema; a preference dataset uploaded through the REST API plans DPO by default and
ORPO when asked; a real Celery worker trains it on the tiny model, records a version, merges it, and the inference
server (built-in engine) serves the merged model, which answers like the adapter learned."""
import json

import pytest

from tests.conftest import wait_for

from .test_deploy import alice, answer, deploy, serving  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PAIRS = [("ping", "pong", "no"), ("cat", "chat", "dog"), ("hello", "bonjour", "bye")]


def preference_file() -> bytes:
    rows = [{"prompt": q, "chosen": a, "rejected": r} for q, a, r in PAIRS * 12]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_the_registry_puts_orpo_on_the_train_page_and_in_the_api_schema(client, user):
    client.force_login(user)
    page = client.get("/jobs/new/").content.decode()
    assert '<option value="orpo"' in page
    schema = client.get("/api/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json").content.decode()
    assert "orpo" in schema and "dpo" in schema


def test_orpo_trains_versions_merges_and_serves(alice, live_server, tiny_base_model, serving, celery_worker):  # noqa: F811
    response = alice.post(f"{alice.base}/datasets", files={"file": ("prefs.jsonl", preference_file())},
                          data={"validation_fraction": "0.25"})
    assert response.status_code == 201, response.text
    dataset = wait_for(
        lambda: (d := alice.get(f"{alice.base}/datasets/{response.json()['id']}").json())["status"] != "validating"
        and d, what="dataset validation", log_proc=celery_worker)
    assert dataset["status"] == "ready", dataset

    assert alice.post(f"{alice.base}/plans", json={"dataset": dataset["id"]}).json()["method"] == "dpo"
    plan = alice.post(f"{alice.base}/plans", json={"dataset": dataset["id"], "method": "orpo"}).json()
    assert plan["method"] == "orpo" and plan["orpo_beta"] == 0.1 and plan["learning_rate"] == 8e-6, plan
    assert plan["memory"]["total_bytes"] > 0 and any("ORPO (LoRA)" in r for r in plan["reasons"])

    response = alice.post(f"{alice.base}/jobs", json={
        "dataset": dataset["id"], "method": "orpo", "adapter_name": "ping-orpo",
        "overrides": {"max_steps": 30, "micro_batch": 8, "grad_accum": 1, "learning_rate": 1e-2, "rank": 8,
                      "alpha": 16, "max_seq_len": 64, "warmup_ratio": 0.0, "early_stopping_patience": 0,
                      "orpo_beta": 0.2, "dtype": "fp32", "search": False},  # fp32: steady at this tiny scale
    })
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    job = wait_for(
        lambda: (j := alice.get(f"{alice.base}/jobs/{job_id}").json())["status"] not in ("queued", "running") and j,
        timeout=300, what="ORPO training", log_proc=celery_worker)
    assert job["status"] == "succeeded", job
    assert job["metrics"]["reward_accuracy"] == 1.0 and job["plan"]["orpo_beta"] == 0.2

    version = alice.get(f"{alice.base}/adapter-versions/{job['adapter_version']}").json()
    assert version["method"] == "orpo" and version["plan"]["method"] == "orpo"

    _, deployment = deploy(alice, version["id"], celery_worker, merge=True)
    assert deployment["status"] == "live", deployment
    assert deployment["details"]["merged"] is True
    assert answer(live_server, alice.token, deployment["name"]) == "pong"
