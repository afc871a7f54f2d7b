"""Job monitoring pages (issue 6): list pages run a number of queries that does not grow with the number of jobs,
metrics are downsampled in SQL and stay fast with 100k points, and the job page shows what a user needs to judge
a run (progress, ETA, memory against the plan and the fit check, events, log) and its controls work."""
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.metrics import as_series, downsampled_points
from jobs.models import BaseModel, Dataset, FineTuneJob, JobEvent, JobStatus, MetricPoint, Worker
from jobs.views import format_duration

pytestmark = pytest.mark.django_db

PLAN = {"method": "lora", "rank": 8, "alpha": 16, "micro_batch": 2, "grad_accum": 1, "max_seq_len": 128,
        "learning_rate": 1e-3, "epochs": 1,
        "memory": {"total_bytes": 2 * 1024**3, "capacity_bytes": 8 * 1024**3, "breakdown": {"weights": 1024**3}}}


@pytest.fixture
def base_model(db):
    return BaseModel.objects.create(owner=None, name="tiny-base", path="/nonexistent", architecture="LlamaForCausalLM",
                                    model_type="llama", sha256="abc123", is_default=True)


def make_dataset(owner, name="support"):
    return Dataset.objects.create(owner=owner, name=name, content_hash=f"hash-{name}-{owner.pk}",
                                  file_path="/nonexistent", status=Dataset.Status.READY, schema="messages", rows=10)


def make_jobs(owner, base_model, dataset, n, start=0):
    """n jobs cycling through every status, each with a few metric points and events."""
    statuses = [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]
    now = timezone.now()
    jobs = []
    for i in range(start, start + n):
        status = statuses[i % len(statuses)]
        jobs.append(FineTuneJob(
            owner=owner, base_model=base_model, dataset=dataset, method="auto", plan=PLAN, adapter_name=f"line-{i}",
            status=status, progress=0.5 if status == JobStatus.RUNNING else (1.0 if status == "succeeded" else 0.0),
            step=5, total_steps=10, metrics={"train_loss": 1.5, "eta_seconds": 125},
            created_at=now - timedelta(minutes=i), started_at=None if status == "queued" else now - timedelta(minutes=i),
        ))
    jobs = FineTuneJob.objects.bulk_create(jobs)
    MetricPoint.objects.bulk_create([MetricPoint(job=j, step=s, train_loss=2.0 / s) for j in jobs for s in (1, 2, 3)])
    JobEvent.objects.bulk_create([JobEvent(job=j, kind="started", message="go") for j in jobs])
    return jobs


def count_queries(client, url):
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200, response.content[:500]
    return len(ctx.captured_queries)


LIST_PAGES = ["/", "/jobs/", "/jobs/?status=queued", "/workers/", "/versions/"]


@pytest.mark.parametrize("url", LIST_PAGES)
def test_list_pages_run_a_constant_number_of_queries(client, user, other_user, base_model, url,
                                                     django_assert_max_num_queries):
    dataset = make_dataset(user)
    make_jobs(user, base_model, dataset, 3)
    make_jobs(other_user, base_model, make_dataset(other_user, "theirs"), 2)  # in the queue ahead of ours
    Worker.objects.create(hostname="w1@host", inventory={"gpus": []}, current_job=FineTuneJob.objects.first())
    client.force_login(user)
    few = count_queries(client, url)
    make_jobs(user, base_model, dataset, 40, start=3)
    for i in range(5):
        Worker.objects.create(hostname=f"w-more-{i}@host", inventory={"gpus": []},
                              current_job=FineTuneJob.objects.order_by("?").first())
    many = count_queries(client, url)
    assert many == few, f"{url}: {few} queries with 5 jobs, {many} with 45"
    with django_assert_max_num_queries(13):  # 13: the measured phase costs of the running jobs' base models
        assert client.get(url).status_code == 200
    htmx = client.get(url, HTTP_HX_REQUEST="true")
    assert htmx.status_code == 200


def test_jobs_list_shows_every_column_and_filters_by_status(client, user, other_user, base_model):
    theirs = make_jobs(other_user, base_model, make_dataset(other_user, "theirs"), 1)  # queued, created first
    theirs[0].created_at = timezone.now() - timedelta(hours=3)
    theirs[0].save()
    jobs = make_jobs(user, base_model, make_dataset(user), 5)
    client.force_login(user)
    page = client.get("/jobs/").content.decode()
    for text in ("alice", "tiny-base", "support", "lora", "line-0", "line-4"):
        assert text in page, text
    assert "line-" in page and "theirs" not in page, "another user's jobs never show"
    queued = jobs[0]
    assert f'data-job="{queued.pk}"' in page
    assert ">position 2</small>" in page, "behind the other user's older queued job"
    assert "2m 05s" in page, "remaining time from the trainer's eta"
    running = client.get("/jobs/?status=running").content.decode()
    assert f'data-job="{jobs[1].pk}"' in running and f'data-job="{queued.pk}"' not in running
    assert client.get("/jobs/?status=bogus").status_code == 200  # unknown filter: all jobs


def test_job_page_shows_progress_memory_fit_check_events_and_log(client, user, other_user, base_model):
    job = make_jobs(user, base_model, make_dataset(user), 2)[1]
    job.metrics = {"train_loss": 1.2345, "eval_loss": 1.5, "tokens_per_second": 812.0, "eta_seconds": 3700,
                   "memory_bytes": 3 * 1024**3, "learning_rate": 2e-4,
                   "fit_check": {"estimated_bytes": 2 * 1024**3, "measured_bytes": int(2.5 * 1024**3),
                                 "capacity_bytes": 8 * 1024**3, "fits": True, "batch_tokens": 256,
                                 "micro_batch": 2, "max_seq_len": 128, "device": "cpu", "device_name": "cpu"}}
    job.save()
    JobEvent.objects.create(job=job, kind="checkpoint", message="Checkpoint saved at step 5.")
    JobEvent.objects.create(job=job, kind="oom_recovered", message="Out of memory: micro_batch 4 -> 2.")
    client.force_login(user)
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert 'aria-valuenow="50.0"' in page and "1h 01m" in page  # progress and ETA
    assert "812" in page and "1.2345" in page
    assert "3.0 GiB" in page and "2.0 GiB" in page, "memory used against the plan's estimate"
    assert 'id="fit-check"' in page and "2.5 GiB" in page and "256" in page
    assert "Checkpoint saved at step 5." in page and "oom_recovered" in page
    assert "step 3/10" in page, "the log falls back to the last reported steps"
    assert "loss-chart" in page and "vendor/chartjs/chart.umd.js" in page
    fragment = client.get(f"/jobs/{job.pk}/", HTTP_HX_REQUEST="true").content.decode()
    assert fragment.startswith('{% load') is False and 'id="job-live"' in fragment and "hx-trigger" in fragment
    client.force_login(other_user)
    assert client.get(f"/jobs/{job.pk}/").status_code == 404
    assert client.get(f"/jobs/{job.pk}/metrics.json").status_code == 404


def test_a_flood_of_evaluations_and_checkpoints_keeps_the_milestones_in_view(client, user, base_model):
    # A fast machine logs hundreds of evaluations and checkpoints in seconds; "started" and warnings stay listed.
    job = make_jobs(user, base_model, make_dataset(user), 2)[1]
    JobEvent.objects.create(job=job, kind="oom_recovered", message="Out of memory: micro_batch 4 -> 2.")
    later = timezone.now() + timedelta(seconds=1)
    JobEvent.objects.bulk_create([event for s in range(200) for event in (
        JobEvent(job=job, kind="evaluated", message=f"Step {s}: eval loss 0.5.", created_at=later),
        JobEvent(job=job, kind="checkpoint", message=f"Checkpoint saved at step {s}.", created_at=later))])
    client.force_login(user)
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    events = page.split('id="job-events"')[1].split("</ul>")[0]
    assert "<b>started</b>" in events and "oom_recovered" in events
    assert "Checkpoint saved at step 199." in events and "Step 199: eval loss" in events, "the newest routine ones"
    assert events.count("<li") <= 40


def test_finished_job_page_stops_polling(client, user, base_model):
    job = make_jobs(user, base_model, make_dataset(user), 3)[2]  # succeeded
    client.force_login(user)
    fragment = client.get(f"/jobs/{job.pk}/", HTTP_HX_REQUEST="true").content.decode()
    assert "hx-trigger" not in fragment.split(">")[0]


def test_cancel_retry_and_clone(client, user, base_model):
    dataset = make_dataset(user)
    queued, running, _, failed, _ = make_jobs(user, base_model, dataset, 5)
    failed.overrides = {"rank": 4, "max_steps": 7, "dropout": 0.1}
    failed.save()
    client.force_login(user)
    client.post(f"/jobs/{queued.pk}/cancel")
    queued.refresh_from_db()
    assert queued.status == JobStatus.CANCELLED
    response = client.post(f"/jobs/{running.pk}/cancel", HTTP_HX_REQUEST="true")
    assert "stopping" in response.content.decode()
    running.refresh_from_db()
    assert running.cancel_requested and running.status == JobStatus.RUNNING  # the worker stops it
    client.post(f"/jobs/{failed.pk}/retry")
    failed.refresh_from_db()
    assert failed.status == JobStatus.QUEUED and failed.events.filter(kind="queued").exists()
    form = client.get(f"/jobs/new/?clone={failed.pk}").content.decode()
    assert 'id="clone-notice"' in form and 'value="line-3"' in form
    assert 'name="rank" type="number" min="1" value="4"' in form and 'value="7"' in form
    assert "dropout" in form, "overrides without a field of their own go to the JSON box"
    assert client.get("/jobs/new/?clone=abc").status_code == 404
    assert client.get(f"/jobs/{running.pk}/retry").status_code == 405


def test_workers_page_marks_silent_workers(client, user, other_user, base_model, settings):
    mine = make_jobs(user, base_model, make_dataset(user), 2)[1]
    theirs = make_jobs(other_user, base_model, make_dataset(other_user, "x"), 2)[1]
    gpu = {"index": 0, "name": "Test GPU", "total_bytes": 16 * 1024**3, "free_bytes": 12 * 1024**3, "bf16": True}
    Worker.objects.create(hostname="alive@box", inventory={"gpus": [gpu], "cpu": {"cores": 4}}, current_job=mine)
    Worker.objects.create(hostname="gone@box", inventory={"gpus": []}, current_job=theirs,
                          last_heartbeat=timezone.now() - timedelta(seconds=10 * settings.WORKER_HEARTBEAT_SECONDS))
    client.force_login(user)
    page = client.get("/workers/").content.decode()
    alive = page[page.index('data-worker="alive@box"'):page.index('data-worker="gone@box"')]
    gone = page[page.index('data-worker="gone@box"'):]
    assert "online" in alive and "Test GPU" in alive and "4.0 GiB used of 16.0 GiB" in alive
    assert f"#{mine.pk} line-1" in alive
    assert "silent" in gone and "another user" in gone and "line-1" not in gone


def test_metrics_downsampled_with_100k_points_in_few_queries(client, user, base_model):
    job = make_jobs(user, base_model, make_dataset(user), 2)[1]
    MetricPoint.objects.filter(job=job).delete()
    n = 100_000
    with connection.cursor() as cursor:  # one INSERT ... SELECT: the fixture is not what is being measured
        cursor.execute(
            "INSERT INTO jobs_metricpoint (job_id, step, train_loss, eval_loss, learning_rate, memory_bytes, created_at)"
            " SELECT %s, s, 1.0 + 1.0 / s, CASE WHEN s %% 1000 = 0 THEN 2.0 ELSE NULL END, 1e-3, 1000, now()"
            " FROM generate_series(1, %s) AS s", [job.pk, n])
    points = downsampled_points(job, 500)
    assert 250 <= len(points) <= 500 and points[-1]["step"] == n
    assert [p["step"] for p in points] == sorted(p["step"] for p in points)
    first_bucket = -(-n // 500)  # 200 steps per bucket: the mean of 1 + 1/s over s = 1..200
    assert points[0]["train_loss"] == pytest.approx(1 + sum(1 / s for s in range(1, first_bucket + 1)) / first_bucket)
    assert sum(1 for p in points if p["eval_loss"] is not None) == n // 1000, "sparse series stay sparse"
    client.force_login(user)
    with CaptureQueriesContext(connection) as ctx:
        data = client.get(f"/jobs/{job.pk}/metrics.json?max_points=200").json()
    assert len(ctx.captured_queries) <= 6
    assert data["count"] <= 200 and len(data["series"]["step"]) == data["count"]
    assert data["plan_memory_bytes"] == PLAN["memory"]["total_bytes"]
    assert client.get(f"/jobs/{job.pk}/metrics.json?max_points=x").status_code == 400
    assert client.get(f"/jobs/{job.pk}/").status_code == 200  # timings: bench/page_latency.py


def test_small_series_are_returned_whole():
    points = [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": None}]
    series = as_series(points)
    assert series["step"] == [1, 2] and series["train_loss"] == [1.0, None] and series["memory_bytes"] == [None, None]


def test_format_duration():
    assert [format_duration(x) for x in (None, 3, 245, 7380, 3 * 86400 + 4 * 3600)] == \
        ["", "3s", "4m 05s", "2h 03m", "3d 4h"]
