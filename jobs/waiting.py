"""What each queued thing waits for, and its place in its queue, read from the database (no broker peeking).

Three kinds of work go through Celery queues: training jobs and deploy merges (always the "gpu" queue) and
evaluations ("gpu" for a full prompt set, "interactive" for a few typed prompts; jobs.evaluation.queue_for).
The database row of each says whether it runs or waits and since when, so one ordered line per queue is:
what runs now, then what waits, oldest first (a worker takes messages in arrival order, one at a time).
Other users' work is counted but never named.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone

GPU = "gpu"


@dataclass
class Work:
    kind: str  # "training" | "merge" | "evaluation"
    key: str  # "job:3", "deployment:4:7" (id:revision), "evaluation:<set_id>:<queued_at>"
    owner_id: int | None
    running: bool
    since: datetime
    label: str
    url: str = ""
    worker: str = ""

    def describe(self, user) -> str:
        if self.owner_id is not None and user is not None and self.owner_id == user.pk:
            return self.label
        return f"another user's {self.kind}"


def _parse(when) -> datetime:
    try:
        parsed = datetime.fromisoformat(when)
    except (TypeError, ValueError):
        return timezone.now()
    return parsed if parsed.tzinfo else timezone.make_aware(parsed)


def _training() -> list[Work]:
    from .models import FineTuneJob, JobStatus

    rows = FineTuneJob.objects.filter(status__in=[JobStatus.QUEUED, JobStatus.RUNNING]).values_list(
        "pk", "owner_id", "status", "created_at", "started_at", "adapter_name", "worker")
    return [Work("training", f"job:{pk}", owner, status == JobStatus.RUNNING,
                 (started or created) if status == JobStatus.RUNNING else created,
                 f"training job #{pk} ({name})", f"/jobs/{pk}/", worker or "")
            for pk, owner, status, created, started, name, worker in rows]


def merge_started(deployment) -> bool:
    """A merge task writes merge_started_at for the revision it works on (jobs.deploy_worker.run_deploy)."""
    details = deployment.details or {}
    return bool(details.get("merge_started_at")) and details.get("merge_revision") == deployment.revision


def _merges() -> list[Work]:
    from .models import Deployment

    work = []
    for d in Deployment.objects.filter(status=Deployment.Status.MERGING).only(
            "pk", "owner_id", "revision", "details", "updated_at", "name"):
        running = merge_started(d)
        since = _parse(d.details.get("merge_started_at")) if running else d.updated_at
        work.append(Work("merge", f"deployment:{d.pk}:{d.revision}", d.owner_id, running, since,
                         f"the merge of deployment {d.name}", f"/deployments/{d.pk}/",
                         d.details.get("merge_worker", "") if running else ""))
    return work


def _evaluations() -> list[tuple[str, Work]]:
    """One entry per evaluation task (a task covers every version queued with the same set at the same time)."""
    from .models import AdapterVersion

    seen = {}
    active = AdapterVersion.objects.filter(metrics__icontains='"queued"') | AdapterVersion.objects.filter(
        metrics__icontains='"running"')
    for pk, owner, metrics in active.values_list("pk", "owner_id", "metrics"):
        sets = ((metrics or {}).get("evaluation") or {}).get("sets") or {}
        for set_id, entry in sets.items():
            status = entry.get("status")
            if status not in ("queued", "running"):
                continue
            key = f"evaluation:{set_id}:{entry.get('queued_at')}"
            running = status == "running"
            if key not in seen:
                n = len(entry.get("prompts") or [])
                label = f"an evaluation of {n} prompt{'s' if n != 1 else ''} ({entry.get('name') or 'prompts'})"
                since = _parse(entry.get("started_at") if running else entry.get("queued_at"))
                seen[key] = (entry.get("queue") or GPU,
                             Work("evaluation", key, owner, running, since, label, f"/versions/{pk}/",
                                  entry.get("worker", "") if running else ""))
            elif running:
                seen[key][1].running = True
    return list(seen.values())


def line(queue: str) -> list[Work]:
    """The queue's work: running first, then waiting, oldest first."""
    work = [w for q, w in _evaluations() if q == queue]
    if queue == GPU:
        work += _training() + _merges()
    return sorted(work, key=lambda w: (not w.running, w.since, w.key))


def positions(work: list[Work]) -> dict[str, int]:
    """key -> place in the queue (1 = next to run) of each waiting item of a queue's line(): the one count of a
    queue position, behind place() (job page, API, evaluations, merges) and job_positions() (job lists)."""
    waiting = [w for w in work if not w.running]  # line() puts what runs first, so a waiting item's
    return {w.key: n for n, w in enumerate(waiting, start=1)}  # place is its rank among the waiting


def job_positions() -> dict[int, int]:
    """job id -> place in the gpu queue of every queued training job, from one read of the queue."""
    return {int(key.split(":")[1]): n for key, n in positions(line(GPU)).items() if key.startswith("job:")}


def place(queue: str, key: str, user=None) -> dict | None:
    """{"queue", "position" (1 = next to run), "waiting_for": [descriptions], "ahead": n} for waiting work;
    None when it is not waiting (running, finished or unknown)."""
    work = line(queue)
    index = next((i for i, w in enumerate(work) if w.key == key), None)
    if index is None or work[index].running:
        return None
    running = [w for w in work[:index] if w.running]
    position = positions(work)[key]
    return {
        "queue": queue,
        "position": position,
        "ahead": position - 1,
        "waiting_for": [w.describe(user) for w in running] or ["a free worker on the " + queue + " queue"],
        "running_urls": [(w.describe(user), w.url if w.owner_id == getattr(user, "pk", None) else "")
                         for w in running],
    }


def sentence(spot: dict | None) -> str:
    """'queued (position 2 in the gpu queue), waiting for training job #3 (support)'."""
    if not spot:
        return ""
    return (f"queued (position {spot['position']} in the {spot['queue']} queue), waiting for "
            + ", ".join(spot["waiting_for"]))


def busy_workers() -> dict[str, list[str]]:
    """hostname -> what it runs now besides a training job (evaluations and merges), for the Workers page."""
    busy: dict[str, list[str]] = {}
    for w in [w for _, w in _evaluations()] + _merges():
        if w.running and w.worker:
            busy.setdefault(w.worker, []).append(w)
    return busy
