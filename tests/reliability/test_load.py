"""Load: 50 simulated users browse (bench/load.py) the production web server (gunicorn, 2 processes x 8 threads,
so at most 16 database connections) while one worker trains 20 queued jobs;
the jobs run one at a time in the order they were queued, each exactly once, and no page fails."""
import sys
from pathlib import Path

import pytest

from helpers import (
    events,
    free_port,
    make_job,
    send_train,
    start_gunicorn,
    start_worker,
    stop_worker,
    worker_database_url,
    django_env,
    wait_for,
    wait_for_worker_ready,
)
from jobs.models import AdapterVersion, FineTuneJob, JobStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from load import log_in, report, run_load  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.django_db(transaction=True)]
JOBS = 20


def test_fifty_users_browse_while_twenty_queued_jobs_run_in_order_once(tmp_path, user, dataset, private_redis,
                                                                       workers):
    jobs = [make_job(user, dataset, max_steps=1).pk for _ in range(JOBS)]
    worker = start_worker("load", tmp_path / "worker.log", broker_url=private_redis.url)
    workers.append(worker)
    port = free_port()
    web = start_gunicorn(port, django_env(worker_database_url(), private_redis.url), tmp_path / "web.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_worker_ready(worker)
        for job_id in jobs:
            send_train(job_id, private_redis.url)
        wait_for(lambda: FineTuneJob.objects.filter(pk=jobs[0], status=JobStatus.RUNNING).exists(), timeout=60,
                 what="the first job to start", log_proc=worker)

        def all_done():
            return not FineTuneJob.objects.filter(pk__in=jobs, status__in=FineTuneJob.ACTIVE).exists()

        stats = run_load(base, log_in(base, "alice", "alice-pw"), users=50, seconds=30, stop=all_done,
                         extra_pages=[f"/jobs/{jobs[0]}/", f"/api/v1/jobs/{jobs[-1]}"])
        print("\nload:", report(stats))
        running = FineTuneJob.objects.filter(pk__in=jobs, status__in=FineTuneJob.ACTIVE).count()
        print(f"jobs still queued or running when the load stopped: {running} of {JOBS}")
        wait_for(all_done, timeout=400, interval=2, what="the 20 jobs", log_proc=worker)
    finally:
        stop_worker(web)
    assert stats["requests"] > 100 and not stats["errors"], stats["errors"][:10]

    finished = {j.pk: j for j in FineTuneJob.objects.filter(pk__in=jobs)}
    assert all(j.status == JobStatus.SUCCEEDED and j.attempts == 1 for j in finished.values()), \
        [(j.pk, j.status, j.attempts, j.error) for j in finished.values()]
    starts = {job_id: [e for e in events(job_id, "started") if e.message.startswith("Started on")] for job_id in jobs}
    assert all(len(s) == 1 for s in starts.values())  # each once
    order = sorted(jobs, key=lambda j: starts[j][0].created_at)
    assert order == jobs  # in the order queued
    spans = [(finished[j].started_at, finished[j].finished_at) for j in jobs]
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))  # one at a time
    assert AdapterVersion.objects.filter(job_id__in=jobs).count() == JOBS
