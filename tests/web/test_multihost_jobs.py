"""A job across two workers (issue 36): two Celery workers on this machine, one rank each, meeting at a c10d
rendezvous on 127.0.0.1 through the job queue. The worker that claims the job is node 0 and reports; the other
joins through a join task on the gpu queue. The placement is on the API and the job page; cancel stops both; a killed rank on the joining node fails the job
naming that node and its worker."""
import os
import signal
import uuid

import pytest
from tinymodel import learnable_chat_rows

from finetune.distributed_launch import rank_pids
from finetune.processes import process_alive
from jobs.models import FineTuneJob

from .conftest import api_session, purge_broker, start_worker, stop_worker, wait_for, wait_for_worker_row
from .test_pipeline import jsonl, upload, wait_dataset

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

TWO_NODES = {"gpus": 2, "nodes": 2, "micro_batch": 4, "grad_accum": 2, "learning_rate": 1e-2,
             "early_stopping_patience": 0, "dropout": 0.0, "search": False}


@pytest.fixture
def workers(tmp_path):
    purge_broker()
    env = {"TUNEDECK_RENDEZVOUS_HOST": "127.0.0.1", "TUNEDECK_NODE_JOIN_SECONDS": "180"}
    names = [f"node-{side}-{uuid.uuid4().hex[:6]}" for side in "ab"]
    procs = [start_worker(name, tmp_path / f"{name}.log", extra_env=env) for name in names]
    paused = []
    try:
        for name, proc in zip(names, procs):
            wait_for_worker_row(name, proc)
        paused = pause_other_gpu_consumers(names)
        yield procs
    finally:
        resume_gpu_consumers(paused)
        for proc in procs:
            stop_worker(proc)


def pause_other_gpu_consumers(ours) -> list[str]:
    """The session's worker (started by earlier tests) consumes the gpu queue too: it would claim the job or the
    join task without this test's settings. Celery's remote control stops it consuming that queue meanwhile."""
    from tunedeck.celery import app

    replies = app.control.inspect(timeout=3).active_queues() or {}
    others = [host for host, queues in replies.items()
              if host.split("@")[0] not in ours and any(q.get("name") == "gpu" for q in queues)]
    if others:
        app.control.cancel_consumer("gpu", destination=others, reply=True, timeout=5)
    return others


def resume_gpu_consumers(hosts) -> None:
    from tunedeck.celery import app

    if hosts:
        app.control.add_consumer("gpu", destination=hosts, reply=True, timeout=5)
        purge_broker()


@pytest.fixture
def api(live_server, user, tiny_base_model):
    return api_session(live_server)


def _start(api, workers, **overrides):
    response = upload(api, jsonl(learnable_chat_rows(48)), validation_fraction="0.25")
    assert response.status_code in (200, 201), response.text
    dataset = wait_dataset(api, response.json()["id"], workers)
    assert dataset["status"] == "ready", dataset
    response = api.post(f"{api.base}/jobs", json={"dataset": dataset["id"], "method": "lora",
                                                  "adapter_name": "two-nodes", "overrides": {**TWO_NODES, **overrides}})
    assert response.status_code == 201, response.text
    plan = response.json()["plan"]
    assert plan["gpus"] == 2 and plan["nodes"] == 2 and plan["global_batch"] == 8, plan
    return response.json()["id"]


def _job(api, job_id):
    return api.get(f"{api.base}/jobs/{job_id}").json()


def _wait_done(api, job_id, workers):
    return wait_for(lambda: (j := _job(api, job_id))["status"] not in ("queued", "running") and j,
                    timeout=400, what="the job to finish", log_proc=workers)


def _assert_no_rank_left(job_id, workers):
    folder = FineTuneJob.objects.get(pk=job_id).checkpoint_dir
    pids = {**rank_pids(folder / "ranks"), **rank_pids(folder / "ranks-node-1")}
    assert set(pids) == {0, 1}, pids  # node 0 ran rank 0, node 1 rank 1
    wait_for(lambda: not any(process_alive(pid) for pid in pids.values()), timeout=30, what="every rank to be gone",
             log_proc=workers)


def test_a_two_node_job_trains_across_two_workers_and_shows_where(api, workers, client, user):
    job_id = _start(api, workers, max_steps=6)
    job = _wait_done(api, job_id, workers)
    assert job["status"] == "succeeded", job
    assert job["step"] == 6 and job["adapter_version"]
    wait_for(lambda: [n["status"] for n in _job(api, job_id)["nodes"]] == ["finished", "finished"], timeout=60,
             what="both nodes to end", log_proc=workers)
    nodes = _job(api, job_id)["nodes"]
    assert [(n["node"], n["ranks"]) for n in nodes] == [(0, [0]), (1, [1])]
    assert len({n["worker"] for n in nodes}) == 2 and all(n["worker"] for n in nodes)
    assert nodes[0]["worker"] == job["worker"]  # the worker that claimed the job is node 0
    assert nodes[0]["rendezvous"].startswith("127.0.0.1:")
    events = api.get(f"{api.base}/jobs/{job_id}/metrics").json()["events"]
    placement = next(e for e in events if e["kind"] == "placement")
    assert all(n["worker"] in placement["message"] for n in nodes), placement
    client.force_login(user)
    page = client.get(f"/jobs/{job_id}/").content.decode()
    assert 'id="job-nodes"' in page and all(n["worker"] in page for n in nodes)
    _assert_no_rank_left(job_id, workers)


def test_cancel_stops_both_nodes(api, workers):
    job_id = _start(api, workers, max_steps=2000, eval_every_steps=1000)
    wait_for(lambda: _job(api, job_id)["step"] >= 2, timeout=300, what="step 2", log_proc=workers)
    assert api.post(f"{api.base}/jobs/{job_id}/cancel").status_code == 202
    job = _wait_done(api, job_id, workers)
    assert job["status"] == "cancelled", job
    # node 1 stopped at the same micro-batch (its ranks agree on the cancel with node 0's) and says it finished
    wait_for(lambda: [n["status"] for n in _job(api, job_id)["nodes"]] == ["finished", "finished"], timeout=60,
             what="both nodes to end", log_proc=workers)
    _assert_no_rank_left(job_id, workers)


def test_a_killed_node_fails_the_job_naming_it(api, workers):
    job_id = _start(api, workers, max_steps=2000, eval_every_steps=1000)
    wait_for(lambda: _job(api, job_id)["step"] >= 2, timeout=300, what="step 2", log_proc=workers)
    folder = FineTuneJob.objects.get(pk=job_id).checkpoint_dir
    os.kill(rank_pids(folder / "ranks-node-1")[1], signal.SIGKILL)
    job = _wait_done(api, job_id, workers)
    assert job["status"] == "failed", job
    joiner = job["nodes"][1]["worker"]
    assert f"Node 1 on worker {joiner} failed: Rank 1 was killed by SIGKILL" in job["error"], job["error"]
    _assert_no_rank_left(job_id, workers)
