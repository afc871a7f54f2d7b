"""Training jobs: queued with their plan, cancelled, retried. The worker side of a job is jobs/runner.py."""
from __future__ import annotations

from pathlib import Path

from django.db import transaction
from django.utils import timezone

from .. import limits, queue
from ..base_models import check_ready
from ..errors import InputError
from ..models import BaseModel, Dataset, FineTuneJob, JobEvent, JobStatus
from .plans import clean_method, clean_overrides, make_plan


def _clean_adapter_name(name, dataset) -> str:
    name = (name or "").strip() or f"{Path(dataset.name).stem[:60] or 'adapter'}"
    if len(name) > 200:
        raise InputError("adapter_name is longer than 200 characters.", field="adapter_name")
    return name


def create_job(user, base_model: BaseModel, dataset: Dataset, method="auto", overrides=None, adapter_name="", *,
               plan: dict | None = None) -> FineTuneJob:
    """Queues a job with its plan: the one the caller already made for these same settings (the page shows it
    before queueing), or made here."""
    check_ready(base_model)  # issue 34: a model still downloading from the Hub is planned for, not trained
    if plan is None:
        plan = make_plan(base_model, dataset, method, overrides)
    with transaction.atomic():
        limits.check_queue_room(user)  # issue 31: at most MAX_QUEUED_JOBS_PER_USER queued
        job = FineTuneJob.objects.create(
            owner=user,
            base_model=base_model,
            dataset=dataset,
            method=clean_method(method),
            overrides=clean_overrides(overrides),
            plan=plan,
            adapter_name=_clean_adapter_name(adapter_name, dataset),
        )
        JobEvent.objects.create(job=job, kind="queued", message="Queued for a worker.")
        transaction.on_commit(lambda: queue.send_training(job.pk))
    return job


def request_cancel(job: FineTuneJob) -> FineTuneJob:
    """Queued jobs are cancelled at once; running ones stop at the worker's next check (within seconds)."""
    with transaction.atomic():
        job = FineTuneJob.objects.select_for_update().get(pk=job.pk)
        if job.status == JobStatus.QUEUED:
            job.status = JobStatus.CANCELLED
            job.finished_at = timezone.now()
            job.cancel_requested = True
            job.save(update_fields=["status", "finished_at", "cancel_requested"])
            JobEvent.objects.create(job=job, kind="cancelled", message="Cancelled before it started.")
        elif job.status == JobStatus.RUNNING and not job.cancel_requested:
            job.cancel_requested = True
            job.save(update_fields=["cancel_requested"])
            JobEvent.objects.create(job=job, kind="cancel_requested", message="Cancel requested; stopping.")
    return job


def retry_job(job: FineTuneJob) -> FineTuneJob:
    """A failed or cancelled job goes back to the queue and resumes from its last checkpoint."""
    with transaction.atomic():
        job = FineTuneJob.objects.select_for_update().get(pk=job.pk)
        if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise InputError(f"Only failed or cancelled jobs can be retried; this one is {job.status}.")
        limits.check_queue_room(job.owner)
        job.status = JobStatus.QUEUED
        job.cancel_requested = False
        job.error = ""
        job.finished_at = None
        job.lease_token = ""
        job.save()
        JobEvent.objects.create(job=job, kind="queued", message="Retried: resumes from the last checkpoint.")
        transaction.on_commit(lambda: queue.send_training(job.pk))
    return job
