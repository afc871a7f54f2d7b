"""The whole path through the REST API, a real Celery worker process, PostgreSQL and Redis:
upload -> validate -> plan -> train a tiny model -> adapter version -> download."""
import io
import json
import zipfile

import pytest
from tinymodel import learnable_chat_rows

from .conftest import api_session, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def api(live_server, user, tiny_base_model, celery_worker):
    return api_session(live_server)


def upload(api, content, filename="chat.jsonl", **fields):
    return api.post(f"{api.base}/datasets", files={"file": (filename, content)}, data=fields)


def wait_dataset(api, dataset_id, worker):
    return wait_for(
        lambda: (d := api.get(f"{api.base}/datasets/{dataset_id}").json())["status"] != "validating" and d,
        what="dataset validation", log_proc=worker,
    )


def test_upload_train_and_download_adapter(api, celery_worker):
    response = upload(api, jsonl(learnable_chat_rows(48)), validation_fraction="0.25")
    assert response.status_code == 201, response.text
    dataset = wait_dataset(api, response.json()["id"], celery_worker)
    assert dataset["status"] == "ready", dataset
    assert dataset["schema"] == "messages" and dataset["rows"] == 48
    assert dataset["token_stats"]["max"] >= dataset["token_stats"]["min"] > 0

    again = upload(api, jsonl(learnable_chat_rows(48)), validation_fraction="0.25")
    assert again.status_code == 200 and again.json()["id"] == dataset["id"], "same file reuses the version"

    plan = api.post(f"{api.base}/plans", json={"dataset": dataset["id"], "method": "lora"}).json()
    for key in ("method", "rank", "alpha", "target_modules", "micro_batch", "grad_accum", "max_seq_len",
                "gradient_checkpointing", "learning_rate", "epochs", "memory", "reasons"):
        assert key in plan, key
    assert plan["method"] == "lora" and plan["reasons"]

    response = api.post(f"{api.base}/jobs", json={
        "dataset": dataset["id"], "method": "lora", "adapter_name": "ping-pong",
        "overrides": {"max_steps": 12, "micro_batch": 4, "grad_accum": 1, "learning_rate": 3e-3,
                      "early_stopping_patience": 0},  # all 12 steps: the test follows a full run
    })
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    job = wait_for(
        lambda: (j := api.get(f"{api.base}/jobs/{job_id}").json())["status"] not in ("queued", "running") and j,
        timeout=300, what="training", log_proc=celery_worker,
    )
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["step"] == job["total_steps"] == 12
    assert job["metrics"]["train_loss"] is not None and job["metrics"]["eval_loss"] is not None

    metrics = api.get(f"{api.base}/jobs/{job_id}/metrics").json()
    assert [p["step"] for p in metrics["points"] if p["train_loss"] is not None][-1] == 12
    assert {"started", "succeeded"} <= {e["kind"] for e in metrics["events"]}
    assert [e["kind"] for e in metrics["events"]].count("started") == 1, "the worker's start, not the trainer's too"
    # Issue 37: the phases around the steps, each with its own time, all closed once the job is done.
    phases = [p["name"] for p in job["phases"]]
    assert phases == ["queued", "loading", "checking_fit", "evaluating_before", "training", "evaluating",
                      "saving"], f"each phase once, in the order of the run: {phases}"
    assert all(p["state"] == "done" and p["seconds"] is not None for p in job["phases"]) and job["phase"] is None

    version = api.get(f"{api.base}/adapter-versions/{job['adapter_version']}").json()
    assert version["adapter_name"] == "ping-pong" and version["version"] == 1
    assert version["dataset"] == dataset["id"] and version["plan"]["method"] == "lora"
    archive = zipfile.ZipFile(io.BytesIO(api.get(f"{api.base}/adapter-versions/{version['id']}/download").content))
    names = set(archive.namelist())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert json.loads(archive.read("adapter_config.json"))["peft_type"] == "LORA"


def test_bad_uploads_get_clear_errors_and_lose_nothing(api, celery_worker):
    good = upload(api, jsonl(learnable_chat_rows(8)), filename="good.jsonl").json()

    empty = upload(api, b"", filename="empty.jsonl")
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"].lower()

    missing = api.post(f"{api.base}/datasets", data={"name": "no file"})
    assert missing.status_code == 400 and "file" in missing.json()["error"]["message"]

    not_json = upload(api, b"this is not json\n{oops\n", filename="bad.jsonl")
    assert not_json.status_code == 201
    bad = wait_dataset(api, not_json.json()["id"], celery_worker)
    assert bad["status"] == "invalid" and bad["error"]

    wrong_schema = upload(api, jsonl([{"foo": 1, "bar": 2}] * 3), filename="wrong.jsonl")
    wrong = wait_dataset(api, wrong_schema.json()["id"], celery_worker)
    assert wrong["status"] == "invalid" and wrong["error"]

    job = api.post(f"{api.base}/jobs", json={"dataset": wrong["id"]})
    assert job.status_code == 400 and "not ready" in job.json()["error"]["message"]

    bad_override = api.post(f"{api.base}/jobs", json={"dataset": good["id"], "overrides": {"rank": -3}})
    assert bad_override.status_code in (400,)
    assert set(bad_override.json()["error"]) >= {"code", "message"}

    listing = api.get(f"{api.base}/datasets").json()["results"]
    assert good["id"] in [d["id"] for d in listing], "earlier uploads are untouched"
