"""Jobs on several ranks through the REST API and a real Celery worker: 2 gloo processes on the CPU, started by
torchrun as the worker's subprocess group (issue 36). Rank 0 reports like a one-process run; cancel reaches
both ranks; a killed rank fails the job naming it and leaves no process; retry resumes from the checkpoint."""
import os
import signal

import pytest
from tinymodel import learnable_chat_rows

from finetune.distributed_launch import rank_pids
from finetune.processes import process_alive
from jobs.models import FineTuneJob

from . import test_deploy, test_pipeline
from .conftest import wait_for
from .test_deploy import answer, deploy
from .test_pipeline import jsonl, upload, wait_dataset

# Fixtures shared with the pipeline and deploy tests: the API session, the web side pointed at the inference server.
api = test_pipeline.api
serving = test_deploy.serving

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

TWO_RANKS = {"gpus": 2, "micro_batch": 4, "grad_accum": 2, "learning_rate": 1e-2, "early_stopping_patience": 0,
             "dropout": 0.0, "search": False}


def _dataset(api, worker):
    response = upload(api, jsonl(learnable_chat_rows(48)), validation_fraction="0.25")
    assert response.status_code in (200, 201), response.text
    dataset = wait_dataset(api, response.json()["id"], worker)
    assert dataset["status"] == "ready", dataset
    return dataset


def _start(api, worker, max_steps, name="two-ranks", **overrides):
    dataset = _dataset(api, worker)
    response = api.post(f"{api.base}/jobs", json={
        "dataset": dataset["id"], "method": "lora", "adapter_name": name,
        "overrides": {**TWO_RANKS, "max_steps": max_steps, **overrides},
    })
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["plan"]["gpus"] == 2 and job["plan"]["parallel"] == "ddp"
    assert job["plan"]["grad_accum"] == 1 and job["plan"]["global_batch"] == 8  # 4 x 1 per rank x 2 ranks
    return job["id"]


def _wait_done(api, job_id, worker, timeout=400):
    return wait_for(
        lambda: (j := api.get(f"{api.base}/jobs/{job_id}").json())["status"] not in ("queued", "running") and j,
        timeout=timeout, what="the job to finish", log_proc=worker,
    )


def _wait_step(api, job_id, worker, step):
    wait_for(lambda: api.get(f"{api.base}/jobs/{job_id}").json()["step"] >= step, timeout=300,
             what=f"step {step}", log_proc=worker)


def _run_dir(job_id):
    return FineTuneJob.objects.get(pk=job_id).checkpoint_dir / "ranks"


def _assert_no_rank_left(job_id, worker):
    pids = rank_pids(_run_dir(job_id))
    assert set(pids) == {0, 1}
    wait_for(lambda: not any(process_alive(pid) for pid in pids.values()),
             timeout=30, what="every rank to be gone", log_proc=worker)


def test_a_two_rank_job_trains_reports_like_one_process_and_its_adapter_serves(api, celery_worker, serving,
                                                                              live_server, token_for, user):
    job_id = _start(api, celery_worker, max_steps=30)
    job = _wait_done(api, job_id, celery_worker)
    assert job["status"] == "succeeded", job
    assert job["step"] == job["total_steps"] == 30 and job["progress"] == 1.0
    metrics = api.get(f"{api.base}/jobs/{job_id}/metrics").json()
    assert [p["step"] for p in metrics["points"] if p["train_loss"] is not None] == list(range(1, 31))
    kinds = [e["kind"] for e in metrics["events"]]
    assert "placement" in kinds and "succeeded" in kinds and kinds.count("started") == 1
    placement = next(e for e in metrics["events"] if e["kind"] == "placement")
    assert "2 ranks" in placement["message"] and "gloo" in placement["message"]
    _assert_no_rank_left(job_id, celery_worker)

    _, deployment = deploy(api, job["adapter_version"], worker=celery_worker)
    assert deployment["status"] == "live", deployment
    assert answer(live_server, token_for(user), deployment["name"]).startswith("pong")


def test_cancel_stops_both_ranks_and_retry_resumes(api, celery_worker):
    job_id = _start(api, celery_worker, max_steps=2000, checkpoint_every_steps=2, eval_every_steps=1000)
    _wait_step(api, job_id, celery_worker, 3)
    assert api.post(f"{api.base}/jobs/{job_id}/cancel").status_code == 202
    job = _wait_done(api, job_id, celery_worker)
    assert job["status"] == "cancelled", job
    _assert_no_rank_left(job_id, celery_worker)
    stopped_at = job["step"]

    # Resume, shorter: the same plan with max_steps lowered would be a new job, so the retry runs to 2000; cancel
    # again once it is past the checkpoint it resumed from.
    retried = api.post(f"{api.base}/jobs/{job_id}/retry")
    assert retried.status_code in (200, 201, 202), retried.text
    _wait_step(api, job_id, celery_worker, stopped_at + 2)
    events = api.get(f"{api.base}/jobs/{job_id}/metrics").json()["events"]
    resumed = [e for e in events if e["kind"] == "resumed"]
    assert resumed and resumed[-1]["data"]["step"] >= 2
    api.post(f"{api.base}/jobs/{job_id}/cancel")
    assert _wait_done(api, job_id, celery_worker)["status"] == "cancelled"
    _assert_no_rank_left(job_id, celery_worker)


def test_a_killed_rank_fails_the_job_naming_it(api, celery_worker):
    job_id = _start(api, celery_worker, max_steps=2000, eval_every_steps=1000)
    _wait_step(api, job_id, celery_worker, 2)
    os.kill(rank_pids(_run_dir(job_id))[1], signal.SIGKILL)
    job = _wait_done(api, job_id, celery_worker)
    assert job["status"] == "failed"
    assert "Rank 1 was killed by SIGKILL" in job["error"], job["error"]
    _assert_no_rank_left(job_id, celery_worker)
