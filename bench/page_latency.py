"""Page latency: dashboard, jobs list and job page with 1,000 jobs and a job with 100k metric points, against an
empty database, in the same run.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/page_latency.py
    ... --jobs 1000 --points 100000 --requests 200

Creates a throwaway PostgreSQL database next to the one DATABASE_URL names (Django's test-database machinery,
named test_<name>_latency; dropped at the end), migrates it, and times requests through Django's test client
(the whole request: middleware, session, views, queries, templates; no network, no web server):

  empty    one user, no other jobs; the job page shows a single job with 10 metric points
  loaded   the same user with --jobs jobs across every status (each with a few metric points and events) and one
           job with --points metric points, whose page and chart data (metrics.json) are timed

The chart data is cached per (job, step, status): "uncached" clears the cache before every request (a poll right
after the worker reported a new step), "cached" is a poll that finds the step unchanged (or a finished job).

Each page is requested --requests times after 5 warm-up requests; prints p50 and p99 in milliseconds, the ratio
loaded/empty, and the number of SQL queries per request.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    return parser.parse_args()


def setup_django():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tunedeck.settings")
    os.environ.setdefault("TUNEDECK_DATA_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "tunedeck-bench-latency"))
    import django

    django.setup()
    from django.conf import settings

    if "postgresql" not in settings.DATABASES["default"]["ENGINE"]:
        sys.exit("Set DATABASE_URL to a PostgreSQL server: the numbers are meant for the production database.")
    settings.DEBUG = False
    settings.ALLOWED_HOSTS = ["*"]
    from django.db import connection

    connection.settings_dict["TEST"]["NAME"] = f"test_{connection.settings_dict['NAME']}_latency"


PLAN = {"method": "lora", "rank": 8, "alpha": 16, "micro_batch": 4, "grad_accum": 2, "max_seq_len": 512,
        "learning_rate": 2e-4, "epochs": 1, "memory": {"total_bytes": 3 * 1024**3, "capacity_bytes": 24 * 1024**3,
                                                       "breakdown": {"weights": 1024**3}}}


def make_fixture(user, base_model, dataset, n_jobs, n_points):
    """n_jobs jobs cycling through the statuses and one running job with n_points points; returns that job."""
    from django.db import connection
    from django.utils import timezone

    from jobs.models import FineTuneJob, JobEvent, JobStatus, MetricPoint

    statuses = list(JobStatus.values)
    now = timezone.now()
    jobs = FineTuneJob.objects.bulk_create([
        FineTuneJob(owner=user, base_model=base_model, dataset=dataset, plan=PLAN, adapter_name=f"line-{i % 40}",
                    status=statuses[i % len(statuses)], progress=0.5, step=50, total_steps=100,
                    metrics={"train_loss": 1.0, "eta_seconds": 600}, created_at=now - timedelta(minutes=i),
                    started_at=now - timedelta(minutes=i))
        for i in range(n_jobs)
    ], batch_size=500)
    MetricPoint.objects.bulk_create([MetricPoint(job=j, step=s, train_loss=1.0 / s) for j in jobs for s in (1, 2, 3)],
                                    batch_size=2000)
    JobEvent.objects.bulk_create([JobEvent(job=j, kind="started", message="Training started.") for j in jobs],
                                 batch_size=2000)
    big = FineTuneJob.objects.create(owner=user, base_model=base_model, dataset=dataset, plan=PLAN,
                                     adapter_name="big", status=JobStatus.RUNNING, step=n_points,
                                     total_steps=n_points * 2, progress=0.5, started_at=now,
                                     metrics={"train_loss": 1.0, "eta_seconds": 3600, "memory_bytes": 2 * 1024**3})
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO jobs_metricpoint (job_id, step, train_loss, eval_loss, learning_rate, grad_norm,"
            " tokens_per_second, memory_bytes, created_at)"
            " SELECT %s, s, 1.0 + 1.0 / s, CASE WHEN s %% 500 = 0 THEN 1.5 ELSE NULL END, 2e-4, 1.0, 900.0,"
            " 2147483648, now() FROM generate_series(1, %s) AS s", [big.pk, n_points])
        cursor.execute("ANALYZE jobs_metricpoint")
    for i in range(30):
        JobEvent.objects.create(job=big, kind="checkpoint", message=f"Checkpoint saved at step {i * 1000}.")
    return big


def measure(client, url, n, headers=None, uncached=False):
    from django.core.cache import cache
    from django.db import connection, reset_queries

    headers = headers or {}
    for _ in range(5):
        assert client.get(url, **headers).status_code == 200, url
    times = []
    for _ in range(n):
        if uncached:
            cache.clear()  # as if the worker had just reported a step
        started = time.perf_counter()
        response = client.get(url, **headers)
        if hasattr(response, "streaming_content"):
            b"".join(response.streaming_content)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, url
    from django.conf import settings

    settings.DEBUG = True
    reset_queries()
    if uncached:
        cache.clear()
    client.get(url, **headers)
    queries = len(connection.queries)
    settings.DEBUG = False
    times.sort()
    return {"p50": statistics.median(times), "p99": times[min(len(times) - 1, int(round(0.99 * len(times))) - 1)],
            "queries": queries}


def options(extra):
    extra = dict(extra or {})
    return {"uncached": extra.pop("uncached", False), "headers": extra}


def pages(job_id):
    htmx = {"HTTP_HX_REQUEST": "true"}
    return [
        ("dashboard", "/", None),
        ("jobs list", "/jobs/", None),
        ("jobs list (htmx poll)", "/jobs/", htmx),
        ("job page", f"/jobs/{job_id}/", None),
        ("job page (htmx poll)", f"/jobs/{job_id}/", htmx),
        ("chart data, new step (uncached)", f"/jobs/{job_id}/metrics.json", {"uncached": True}),
        ("chart data, same step (cached)", f"/jobs/{job_id}/metrics.json", None),
    ]


def main():
    args = parse_args()
    setup_django()
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import setup_test_environment

    from jobs.models import BaseModel, Dataset, FineTuneJob, JobStatus, MetricPoint

    setup_test_environment()
    old_name = connection.settings_dict["NAME"]
    test_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        user = get_user_model().objects.create_user("bench", password="bench")
        base = BaseModel.objects.create(name="SmolLM2-135M-Instruct", path="/unused", sha256="x", is_default=True)
        dataset = Dataset.objects.create(owner=user, name="support", content_hash="h", file_path="/unused",
                                         status=Dataset.Status.READY, rows=1000)
        small = FineTuneJob.objects.create(owner=user, base_model=base, dataset=dataset, plan=PLAN, adapter_name="one",
                                           status=JobStatus.RUNNING, step=10, total_steps=100, progress=0.1)
        MetricPoint.objects.bulk_create([MetricPoint(job=small, step=s, train_loss=1.0 / s) for s in range(1, 11)])
        client = Client()
        client.force_login(user)

        results = {}
        for name, url, headers in pages(small.pk):
            results[(name, "empty")] = measure(client, url, args.requests, **options(headers))
        FineTuneJob.objects.filter(pk=small.pk).delete()

        started = time.perf_counter()
        big = make_fixture(user, base, dataset, args.jobs, args.points)
        print(f"fixture: {args.jobs} jobs + 1 job with {MetricPoint.objects.filter(job=big).count()} points "
              f"({time.perf_counter() - started:.1f}s to create) in database {test_name}")
        for name, url, headers in pages(big.pk):
            results[(name, "loaded")] = measure(client, url, args.requests, **options(headers))
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)

    print(f"\n{args.requests} requests per row (Django test client, PostgreSQL, DEBUG off); milliseconds\n")
    header = f"{'page':32} {'empty p50':>10} {'empty p99':>10} {'loaded p50':>11} {'loaded p99':>11} " \
             f"{'p50 ratio':>10} {'queries e/l':>12}"
    print(header)
    print("-" * len(header))
    for name, _, _ in pages(0):
        e, l = results[(name, "empty")], results[(name, "loaded")]
        print(f"{name:32} {e['p50']:10.1f} {e['p99']:10.1f} {l['p50']:11.1f} {l['p99']:11.1f} "
              f"{l['p50'] / e['p50']:10.2f} {e['queries']:>5} / {l['queries']:<5}")


if __name__ == "__main__":
    main()
