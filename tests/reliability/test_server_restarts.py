"""Redis and PostgreSQL restarted while a job trains, on servers of this test's own (PrivateRedis,
PrivatePostgres: the shared servers are never touched). The worker rides both out: the job finishes once, every
metric point reaches the database, the worker takes new work afterwards, and the pages answer again."""
import json
import re

import psycopg
import pytest
import requests

from helpers import (
    PrivatePostgres,
    PrivateRedis,
    django_env,
    free_port,
    manage,
    run_python,
    send_train,
    start_web_server,
    start_worker,
    stop_worker,
    wait_for,
    wait_for_worker_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 4000  # long enough for both restarts on an idle machine (a bf16-fast CPU ran 400 in about 6 s)
SETUP = """
from django.contrib.auth import get_user_model
from conftest import make_base_model
from helpers import make_ready_dataset, make_job
user = get_user_model().objects.create_user("carol", password="carol-pw")
make_base_model({model!r})
dataset = make_ready_dataset(user)
jobs = [make_job(user, dataset, max_steps={steps}, checkpoint_every_steps=10).pk, make_job(user, dataset, max_steps=3).pk]
print(json.dumps(jobs))
"""


@pytest.fixture
def servers(tmp_path):
    redis = PrivateRedis(tmp_path / "redis").start()
    pg = PrivatePostgres().init().start()
    yield redis, pg
    redis.stop()
    pg.destroy()


def job_row(pg, job_id):
    with psycopg.connect(pg.url.replace("postgres://", "postgresql://"), connect_timeout=3) as conn:
        row = conn.execute("SELECT status, step, attempts, error FROM jobs_finetunejob WHERE id = %s",
                           [job_id]).fetchone()
        steps = [r[0] for r in conn.execute("SELECT step FROM jobs_metricpoint WHERE job_id = %s AND step > 0",
                                            [job_id])]
    return {"status": row[0], "step": row[1], "attempts": row[2], "error": row[3], "points": steps}


def safe_row(pg, job_id):
    try:
        return job_row(pg, job_id)
    except psycopg.OperationalError:
        return None


def log_in(base, username, password):
    session = requests.Session()
    page = session.get(f"{base}/login/", timeout=10)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    done = session.post(f"{base}/login/", data={"username": username, "password": password,
                                                "csrfmiddlewaretoken": token}, timeout=10, allow_redirects=False)
    assert done.status_code == 302, done.text[:500]
    return session


def test_redis_and_postgres_restarted_mid_job(tmp_path, servers, tiny_model_dir):
    redis, pg = servers
    # A lease longer than the outages: a database down longer than the lease would (rightly) requeue the job.
    env = django_env(pg.url, redis.url, TUNEDECK_LEASE_SECONDS="20")
    manage("migrate", "--noinput", env=env)
    job, short_job = run_python(SETUP.format(model=str(tiny_model_dir), steps=STEPS), env)
    worker = start_worker("restarts", tmp_path / "worker.log", database_url=pg.url, broker_url=redis.url,
                          extra_env={"TUNEDECK_LEASE_SECONDS": "20"})
    port = free_port()
    web = start_web_server(port, env, tmp_path / "web.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_worker_ready(worker)
        browser = log_in(base, "carol", "carol-pw")
        send_train(job, redis.url)
        wait_for(lambda: (r := safe_row(pg, job)) and r["step"] >= 5, timeout=120, what="training to start",
                 log_proc=worker)

        redis.restart(down_seconds=2)  # the queue and the running job's unacked message are gone with it
        at = job_row(pg, job)["step"]
        wait_for(lambda: (r := safe_row(pg, job)) and r["step"] >= at + 5, timeout=60,
                 what="training to go on after the Redis restart", log_proc=worker)

        before = job_row(pg, job)
        assert before["status"] == "running" and before["step"] < STEPS, before
        pg.restart(down_seconds=3)
        final = wait_for(lambda: (r := safe_row(pg, job)) and r["status"] not in ("queued", "running") and r,
                         timeout=900, what="the job to finish after the PostgreSQL restart", log_proc=worker)
        assert final["status"] == "succeeded", final["error"]
        assert final["attempts"] == 1  # never requeued, never run twice
        assert sorted(final["points"]) == list(range(1, STEPS + 1))  # nothing lost, nothing written twice

        # The worker reconnected to both: new work sent after the restarts runs.
        send_train(short_job, redis.url)
        short = wait_for(lambda: (r := safe_row(pg, short_job)) and r["status"] == "succeeded" and r, timeout=120,
                         what="a job sent after the restarts", log_proc=worker)
        assert short["attempts"] == 1

        # The web process reconnects too: the same session sees the pages and the API again.
        page = wait_for(lambda: (r := browser.get(f"{base}/jobs/{job}/", timeout=10)).status_code == 200 and r,
                        timeout=30, what="the job page after the restart")
        assert "succeeded" in page.text
        api = browser.get(f"{base}/api/v1/jobs/{job}", timeout=10)
        assert api.status_code == 200 and api.json()["status"] == "succeeded"
        assert json.loads(browser.get(f"{base}/api/v1/jobs", timeout=10).text)["count"] == 2
    finally:
        stop_worker(worker)
        stop_worker(web)
