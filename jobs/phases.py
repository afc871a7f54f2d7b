"""The phases of a training run, before and after its steps (issue 37): what the job page and the API show while
no step is reported yet, each phase's own elapsed time, and the time left from measured phase costs.

`FineTuneJob.phases` is a list of {"name", "started_at", "ended_at" (null while it runs), "step" (the job's step
when it began)} for the current attempt. The worker writes it (jobs/runner.py: the lease-holder only); pages and the
API read it here. Plain reads, no torch.
"""
from __future__ import annotations

from datetime import datetime

from django.utils import timezone

LABELS = {
    "queued": "queued",
    "searching": "searching settings",
    "loading": "loading the model",
    "checking_fit": "checking the fit",
    "evaluating_before": "evaluating before training",
    "training": "training",
    "evaluating": "evaluating",
    "saving": "saving",
}
ORDER = list(LABELS)
# Phases whose cost is the same whatever the number of steps: measured on earlier runs, they make the time left.
FIXED_AFTER_TRAINING = ("evaluating", "saving")
FIXED_BEFORE_TRAINING = ("loading", "checking_fit", "evaluating_before")


def _when(value) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo else timezone.make_aware(parsed)


def begin(phases: list[dict], name: str, step: int = 0, now: datetime | None = None) -> list[dict]:
    """The list with the running phase closed and `name` begun; unchanged when `name` is already running."""
    now = now or timezone.now()
    if phases and phases[-1].get("ended_at") is None and phases[-1]["name"] == name:
        return phases
    closed = end(phases, now)
    return closed + [{"name": name, "started_at": now.isoformat(), "ended_at": None, "step": int(step or 0)}]


def end(phases: list[dict], now: datetime | None = None) -> list[dict]:
    """The list with its running phase (if any) closed now."""
    now = now or timezone.now()
    if phases and phases[-1].get("ended_at") is None:
        return phases[:-1] + [{**phases[-1], "ended_at": now.isoformat()}]
    return list(phases)


def current_name(phases: list[dict]) -> str | None:
    """The running phase of a list being written (the worker's own copy)."""
    return phases[-1]["name"] if phases and phases[-1].get("ended_at") is None else None


def seconds(entry: dict, now: datetime) -> float | None:
    start = _when(entry.get("started_at"))
    stop = _when(entry.get("ended_at")) or now
    return max(0.0, (stop - start).total_seconds()) if start else None


def current(job) -> str | None:
    """The running phase of an active job (queued for a queued job that no worker took yet)."""
    if job.status == "queued":
        return "queued"
    phases = job.phases or []
    if job.status == "running" and phases and phases[-1].get("ended_at") is None:
        return phases[-1]["name"]
    return None


def view(job, now: datetime | None = None) -> list[dict]:
    """[{"name", "label", "seconds", "state": done|current}] for the page and the API, oldest first."""
    now = now or timezone.now()
    if job.status == "queued":
        return [{"name": "queued", "label": LABELS["queued"], "state": "current",
                 "seconds": max(0.0, (now - job.created_at).total_seconds())}]
    rows = []
    for entry in job.phases or []:
        running = entry.get("ended_at") is None and job.status == "running"
        rows.append({"name": entry["name"], "label": LABELS.get(entry["name"], entry["name"].replace("_", " ")),
                     "seconds": seconds(entry, now), "state": "current" if running else "done",
                     "started_at": entry.get("started_at"), "ended_at": entry.get("ended_at")})
    return rows


def measured_costs(base_model_ids) -> dict[int, dict[str, float]]:
    """base model id -> seconds each fixed phase took on its newest finished runs (the median of up to 5), read in
    one query whatever the number of base models (list pages keep a fixed number of queries)."""
    from .models import FineTuneJob, JobStatus

    wanted = set(base_model_ids)
    if not wanted:
        return {}
    found: dict[int, dict[str, list[float]]] = {}
    runs: dict[int, int] = {}
    recent = (FineTuneJob.objects.filter(base_model_id__in=wanted, status=JobStatus.SUCCEEDED)
              .exclude(phases=[]).order_by("-finished_at").values_list("base_model_id", "phases")[:20 * len(wanted)])
    now = timezone.now()
    for base_id, listed in recent:
        runs[base_id] = runs.get(base_id, 0) + 1
        if runs[base_id] > 5:
            continue
        for entry in listed or []:
            if entry.get("ended_at") and entry["name"] in FIXED_BEFORE_TRAINING + FIXED_AFTER_TRAINING:
                found.setdefault(base_id, {}).setdefault(entry["name"], []).append(seconds(entry, now))
    return {base_id: {name: sorted(v)[len(v) // 2] for name, v in by_name.items()}
            for base_id, by_name in found.items()}


def remaining_seconds(job, now: datetime | None = None, costs: dict | None = None) -> float | None:
    """Time left of a running job: the steps left at the rate measured over this attempt's training phase (its
    evaluations included), then the fixed phases after training at their cost on earlier runs of this base model.
    None while nothing is measured yet (before the first steps, or no earlier run to go by)."""
    now = now or timezone.now()
    name = current(job)
    if job.status != "running" or name is None:
        return None
    costs = costs if costs is not None else measured_costs([job.base_model_id]).get(job.base_model_id, {})
    if "evaluating" not in costs:  # no earlier run: the final evaluation costs about what the first one did
        before = [e for e in job.phases or [] if e["name"] == "evaluating_before" and e.get("ended_at")]
        costs = {**costs, "evaluating": seconds(before[-1], now) if before else 0.0}
    after = sum(costs.get(p, 0.0) for p in FIXED_AFTER_TRAINING)
    entry = (job.phases or [])[-1]
    if name in FIXED_AFTER_TRAINING:
        left = sum(costs.get(p, 0.0) for p in FIXED_AFTER_TRAINING[FIXED_AFTER_TRAINING.index(name):])
        return max(0.0, left - (seconds(entry, now) or 0.0)) if costs else None
    if name != "training":
        return None
    done = (job.step or 0) - int(entry.get("step") or 0)
    took = seconds(entry, now)
    if done <= 0 or not took or not job.total_steps:
        return None
    return took / done * max(0, job.total_steps - job.step) + after
