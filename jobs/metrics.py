"""Metric series for charts: all points when few, bucketed averages in SQL when many (100k points stay fast)."""
from django.db.models import Avg, Count, F, Max

from .models import MetricPoint

FIELDS = ["train_loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second", "memory_bytes"]


def downsampled_points(job, max_points: int = 500) -> list[dict]:
    points = MetricPoint.objects.filter(job=job)
    last_step = points.aggregate(last=Max("step"))["last"]
    if last_step is None:
        return []
    count = points.count()
    if count <= max_points:
        return list(points.order_by("step", "id").values("step", *FIELDS))
    bucket = max(1, (last_step + max_points) // max_points)
    rows = (
        points.annotate(bucket=F("step") / bucket)
        .values("bucket")
        .annotate(step=Max("step"), n=Count("id"), **{name: Avg(name) for name in FIELDS})
        .order_by("bucket")
    )
    return [{"step": r["step"], **{name: r[name] for name in FIELDS}} for r in rows]
