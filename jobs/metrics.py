"""Metric series for charts: all points when few, bucketed averages computed in SQL when many.

A job may log 100k points (one per optimizer step); a chart needs a few hundred. Bucketing happens in the
database with one GROUP BY over the (job, step) index, so neither Python nor the browser sees the raw rows.
Averages of a bucket are a faithful picture of a noisy loss curve; sparse series (validation loss, logged every
N steps) stay sparse because AVG ignores NULLs.
"""
from django.db.models import Avg, Count, F, Max, Min

from .models import MetricPoint

FIELDS = list(MetricPoint.SERIES)
DEFAULT_POINTS = 500


def _span(points):
    return points.aggregate(first=Min("step"), last=Max("step"), n=Count("id"))


def downsampled_points(job, max_points: int = DEFAULT_POINTS) -> list[dict]:
    """At most max_points dicts {"step", *FIELDS}, one per step or bucket of steps, in step order (two queries
    whatever the size)."""
    job_id = job if isinstance(job, int) else getattr(job, "pk", None)
    if job_id is None:
        return []
    max_points = max(2, int(max_points))
    points = MetricPoint.objects.filter(job_id=job_id)
    span = _span(points)
    if not span["n"]:
        return []
    first, last = span["first"], span["last"]
    # Ceiling division: at most max_points buckets. With few points a bucket is one step, which still merges
    # the rows a resumed run logs again for the steps after its checkpoint.
    bucket = max(1, -(-(last - first + 1) // max_points))
    rows = (
        points.annotate(bucket=(F("step") - first) / bucket)
        .values("bucket")
        .annotate(step=Max("step"), **{name: Avg(name) for name in FIELDS})
        .order_by("bucket")
    )
    return [{"step": r["step"], **{name: r[name] for name in FIELDS}} for r in rows]


def as_series(points: list[dict]) -> dict:
    """Columnar form for charts: {"step": [...], "train_loss": [...], ...}; memory as whole bytes."""
    series = {"step": [p["step"] for p in points]}
    for name in FIELDS:
        values = [p.get(name) for p in points]
        if name == "memory_bytes":
            values = [int(v) if v is not None else None for v in values]
        series[name] = values
    return series


def recent_points(job, n: int = 15) -> list[dict]:
    """The last n points, newest last (for the log view); one indexed query."""
    rows = list(
        MetricPoint.objects.filter(job_id=job.pk).order_by("-step", "-id").values("step", *FIELDS)[:n]
    )
    rows.reverse()
    return rows
