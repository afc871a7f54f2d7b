"""Worker faults against real PostgreSQL, a private Redis broker and real Celery worker processes:
a worker SIGKILLed mid-training, and a broker that redelivers a job still running (tiny visibility timeout)."""
import time

import pytest

from helpers import (
    events,
    job_state,
    kill_worker,
    make_job,
    send_train,
    start_worker,
    wait_for,
    wait_for_worker_ready,
    worker_log,
)
from jobs.models import AdapterVersion, JobStatus, MetricPoint
from jobs.models import FineTuneJob as JobModel

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

# Long enough to be killed mid-way on an idle machine (the tiny model does tens of steps a second), with a
# checkpoint every few steps to resume from; the timeouts allow for a machine that is busy with other work.
LONG_JOB = {"max_steps": 400, "checkpoint_every_steps": 5}


def runs(job_id):
    """The 'Started on <worker>' events: one per time a worker took the job's lease."""
    return [e for e in events(job_id, "started") if e.message.startswith("Started on")]


def owner_of(job_id, procs):
    hostname = job_state(job_id).worker
    return next(p for p in procs if hostname.startswith(f"{p.worker_name}@"))


def test_sigkilled_worker_job_resumes_from_checkpoint_on_another_worker(
    tmp_path, user, dataset, private_redis, workers
):
    job = make_job(user, dataset, **LONG_JOB)
    for name in ("kill-a", "kill-b"):
        workers.append(start_worker(name, tmp_path / f"{name}.log", broker_url=private_redis.url))
    for proc in workers:
        wait_for_worker_ready(proc)
    send_train(job.pk, private_redis.url)

    # Mid-training, past at least one checkpoint; the idle worker must not have touched the job meanwhile.
    wait_for(lambda: events(job.pk, "checkpoint") and job_state(job.pk).step >= 12, timeout=120, interval=0.05,
             what="a checkpoint and progress past it", log_proc=workers)
    victim = owner_of(job.pk, workers)
    survivor = next(p for p in workers if p is not victim)
    assert len(runs(job.pk)) == 1
    checkpoint_step = events(job.pk, "checkpoint")[-1].data["step"]
    kill_worker(victim)
    killed_at = job_state(job.pk).step  # progress is written before each checkpoint: no checkpoint is past this
    assert job_state(job.pk).status == JobStatus.RUNNING  # nobody noticed yet: the lease still looks fresh

    final = wait_for(lambda: (j := job_state(job.pk)).status not in ("queued", "running") and j, timeout=900,
                     what="the job to finish on the surviving worker", log_proc=[survivor])
    assert final.status == JobStatus.SUCCEEDED, final.error
    assert final.worker.startswith(f"{survivor.worker_name}@") and final.attempts == 2
    orphaned = events(job.pk, "orphaned")
    assert len(orphaned) == 1 and victim.worker_name in orphaned[0].message
    started = runs(job.pk)
    assert len(started) == 2 and survivor.worker_name in started[1].message
    assert started[1].created_at >= orphaned[0].created_at  # the second run began only after the requeue
    resumed = events(job.pk, "resumed")
    assert len(resumed) == 1 and checkpoint_step <= resumed[0].data["step"] <= killed_at
    # The steps the victim wrote before dying are kept; the survivor carried on to the end.
    steps = set(MetricPoint.objects.filter(job=job).values_list("step", flat=True))
    assert set(range(1, LONG_JOB["max_steps"] + 1)) <= steps
    assert AdapterVersion.objects.filter(job=job).count() == 1


def test_job_longer_than_visibility_timeout_runs_once(tmp_path, user, dataset, private_redis, workers):
    """With a 1-second visibility timeout Redis hands the running job's message to the next worker that polls:
    the job row's lease turns that second delivery into a no-op. The job is made too long to finish on its own
    and is cancelled once the second delivery has been seen, so the test does not depend on the machine's speed."""
    env = {"TUNEDECK_VISIBILITY_TIMEOUT": "1"}
    job = make_job(user, dataset, max_steps=100_000, checkpoint_every_steps=1_000_000)
    first = start_worker("vis-a", tmp_path / "vis-a.log", broker_url=private_redis.url, extra_env=env)
    workers.append(first)
    wait_for_worker_ready(first)
    send_train(job.pk, private_redis.url)
    wait_for(lambda: job_state(job.pk).step >= 5, timeout=120, what="training to start", log_proc=first)
    time.sleep(1.5)  # the message is now older than the visibility timeout
    second = start_worker("vis-b", tmp_path / "vis-b.log", broker_url=private_redis.url, extra_env=env)
    workers.append(second)
    wait_for_worker_ready(second)
    wait_for(lambda: "not claimable" in worker_log(second), timeout=120,
             what="the redelivered message to reach the second worker", log_proc=[first, second])
    assert job_state(job.pk).status == JobStatus.RUNNING and job_state(job.pk).worker.startswith("vis-a@")

    JobModel.objects.filter(pk=job.pk).update(cancel_requested=True)
    final = wait_for(lambda: (j := job_state(job.pk)).status not in ("queued", "running") and j, timeout=300,
                     what="the job to stop", log_proc=[first, second])
    assert final.status == JobStatus.CANCELLED, final.error
    assert final.attempts == 1 and len(runs(job.pk)) == 1
    assert final.worker.startswith("vis-a@")
    steps = list(MetricPoint.objects.filter(job=job).values_list("step", flat=True))
    assert len(steps) == len(set(steps)) and max(steps) >= 5  # one run: every step written once
