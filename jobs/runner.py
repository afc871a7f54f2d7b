"""Worker side of a training job: take the job's lease, train, write progress, record the adapter version.

The job row is the source of truth. A worker may train a job only while it holds the job's lease (a random token
plus a heartbeat time); another worker takes over only when the heartbeat is older than JOB_LEASE_SECONDS, so two
workers never train the same job at once, and a broker redelivery of a job that is running is a no-op.
"""
from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from datetime import timedelta

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from finetune.errors import TunedeckError

from . import phases, queue
from .models import FineTuneJob, JobEvent, JobStatus, MetricPoint, Worker
from .periodic import run_every
from .services.search_stage import run_search_stage  # issue 20 (search)

log = logging.getLogger(__name__)

# What a database restart or a dropped connection raises; training rides them out instead of failing the job.
DB_ERRORS = (OperationalError, InterfaceError)
# How long a worker waits for the database to come back before it gives a finished job up.
DB_WAIT_SECONDS = 600


def claim_job(job_id: int, worker_name: str) -> str | None:
    """Atomically takes the job's lease. Returns the lease token, or None if the job is not ours to run."""
    token = secrets.token_hex(16)
    now = timezone.now()
    stale = now - timedelta(seconds=settings.JOB_LEASE_SECONDS)
    taken = FineTuneJob.objects.filter(
        Q(status=JobStatus.QUEUED) | Q(status=JobStatus.RUNNING, heartbeat_at__lt=stale),
        pk=job_id,
        cancel_requested=False,
    ).update(
        status=JobStatus.RUNNING,
        worker=worker_name,
        lease_token=token,
        heartbeat_at=now,
        attempts=F("attempts") + 1,
        started_at=now,
    )
    return token if taken else None


def requeue_orphans() -> list[int]:
    """Jobs whose worker stopped beating its heart are put back in the queue (they resume from a checkpoint)."""
    stale = timezone.now() - timedelta(seconds=settings.JOB_LEASE_SECONDS)
    orphans = list(
        FineTuneJob.objects.filter(status=JobStatus.RUNNING, heartbeat_at__lt=stale).values_list("pk", "worker")
    )
    requeued = []
    for pk, worker in orphans:
        with transaction.atomic():
            n = FineTuneJob.objects.filter(pk=pk, status=JobStatus.RUNNING, heartbeat_at__lt=stale).update(
                status=JobStatus.QUEUED, lease_token="", worker="", heartbeat_at=timezone.now()
            )
            if n:
                JobEvent.objects.create(
                    job_id=pk,
                    kind="orphaned",
                    message=f"Worker {worker or '?'} stopped answering; requeued to resume from the last checkpoint.",
                )
                transaction.on_commit(lambda pk=pk: queue.send_training(pk))
                requeued.append(pk)
    return requeued


def resend_queued() -> list[int]:
    """Sends the task message again for jobs queued longer than JOB_RESEND_SECONDS (by creation, or since the
    last send, kept in heartbeat_at while queued): a broker restarted without persistence, or a publish that
    failed after the job row was committed, would otherwise leave them queued forever. A duplicate message is a
    no-op (claim_job takes a job once), so resending a job whose message is merely waiting costs nothing."""
    from django.db.models.functions import Coalesce

    stale = timezone.now() - timedelta(seconds=settings.JOB_RESEND_SECONDS)
    waiting = list(
        FineTuneJob.objects.filter(status=JobStatus.QUEUED, cancel_requested=False)
        .annotate(sent_at=Coalesce("heartbeat_at", "created_at"))
        .filter(sent_at__lt=stale)
        .order_by("created_at", "pk")
        .values_list("pk", flat=True)
    )
    resent = []
    for pk in waiting:
        # Claims the resend for this period, so the other workers' heartbeats do not send it too.
        n = (
            FineTuneJob.objects.filter(pk=pk, status=JobStatus.QUEUED)
            .annotate(sent_at=Coalesce("heartbeat_at", "created_at"))
            .filter(sent_at__lt=stale)
            .update(heartbeat_at=timezone.now())
        )
        if n:
            queue.send_training(pk)
            resent.append(pk)
    if resent:
        log.info("re-sent the task message of queued jobs %s", resent)
    return resent


class LeaseLost(Exception):
    pass


class JobReporter:
    """Carries progress from the training loop to the database, in batches, and answers should_stop()."""

    FLUSH_SECONDS = 1.0

    def __init__(self, job: FineTuneJob, token: str):
        self.job_id = job.pk
        self.token = token
        self.points: list[MetricPoint] = []
        self.latest: dict = dict(job.metrics or {})
        self.step = job.step
        self.total_steps = job.total_steps
        self.last_flush = 0.0
        self.cancel = False
        self.lease_lost = False
        self.pending_events: list[JobEvent] = []  # events the database did not take yet (it was restarting)
        self.lock = threading.Lock()
        self.phases: list[dict] = list(job.phases or [])
        self.has_validation = bool(job.dataset.validation_path) if job.dataset_id else False

    # The trainer reports the phases before and after its steps through its events; one that emits
    # on_event("phase", message, {"phase": name}) names them itself, else they are read from the events it has.
    def begin_phase(self, name: str):
        with self.lock:
            changed = phases.begin(self.phases, name, self.step)
            if changed is self.phases:
                return
            self.phases = changed
        self.flush()

    def end_phases(self):
        with self.lock:
            self.phases = phases.end(self.phases)

    def _phase_from_event(self, kind: str, data: dict):
        running = phases.current_name(self.phases)
        if kind == "phase" and data.get("phase") in phases.LABELS:
            self.begin_phase(data["phase"])
        elif kind == "fit_check" and not data.get("replanned"):
            self.begin_phase("evaluating_before" if self.has_validation else "training")
        elif kind == "resumed" and running == "evaluating_before":
            self.begin_phase("training")  # a resumed run does not evaluate the base again
        elif kind == "evaluated" and data.get("step") == 0:
            self.begin_phase("training")
        elif kind == "stopped_early":
            self.begin_phase("evaluating")

    def on_progress(self, info: dict):
        step = int(info.get("step") or 0)
        running = phases.current_name(self.phases)
        if step >= 1 and running in phases.FIXED_BEFORE_TRAINING:
            self.begin_phase("training")
        total = int(info.get("total_steps") or self.total_steps or 0)
        if total and step >= total and running in ("training", *phases.FIXED_BEFORE_TRAINING):
            self.begin_phase("evaluating")  # the last step: the trainer saves and generates samples next
        with self.lock:
            self.step = int(info.get("step", self.step))
            self.total_steps = int(info.get("total_steps", self.total_steps) or 0)
            for key in ("train_loss", "eval_loss", "perplexity", "learning_rate", "grad_norm",
                        "tokens_per_second", "eta_seconds", "memory_bytes", "epoch"):
                if info.get(key) is not None:
                    self.latest[key] = info[key]
            self.points.append(MetricPoint(job_id=self.job_id, step=self.step,
                                           **{name: info.get(name) for name in MetricPoint.SERIES}))
        if info.get("checkpoint_due") or time.monotonic() - self.last_flush >= self.FLUSH_SECONDS:
            self.flush()

    def on_event(self, kind: str, message: str, data: dict | None = None):
        self._phase_from_event(kind, data or {})
        if kind == "phase":
            return  # shown as the job's phase, not as an event
        if kind == "started":  # the worker said "started" when it took the job; this is the first step coming
            kind = "training"
        event = JobEvent(job_id=self.job_id, kind=kind, message=message, data=_jsonable(data or {}))
        try:
            event.save()
        except DB_ERRORS as exc:
            log.warning("job %s: event %r kept for the next flush (database unreachable: %s)", self.job_id, kind, exc)
            with self.lock:
                self.pending_events.append(event)
            close_old_connections()
        if kind == "oom_recovered" and data:
            self.latest["oom_recoveries"] = self.latest.get("oom_recoveries", 0) + 1
        if kind == "fit_check" and data:
            # Shown on the job page at once (estimate vs measured) and read back by later plans as calibration.
            self.latest["fit_check"] = _jsonable(data)
            self.flush()

    def flush(self):
        """Writes buffered points and the job's latest numbers; also refreshes the lease and reads cancel.

        While the database is unreachable (a restart), the points and events stay buffered and training goes on;
        they are written by the first flush that gets through, if this worker still holds the lease."""
        with self.lock:
            points, self.points = self.points, []
            events, self.pending_events = self.pending_events, []
            progress = min(1.0, self.step / self.total_steps) if self.total_steps else 0.0
            fields = dict(
                phases=list(self.phases),
                step=self.step,
                total_steps=self.total_steps,
                progress=progress,
                metrics=_jsonable(self.latest),
                heartbeat_at=timezone.now(),
            )
        try:
            with transaction.atomic():
                updated = FineTuneJob.objects.filter(pk=self.job_id, lease_token=self.token).update(**fields)
                if updated:  # points from a worker that lost the lease would duplicate the new owner's
                    if events:
                        JobEvent.objects.bulk_create(events)
                    if points:
                        MetricPoint.objects.bulk_create(points)
            if not updated:
                self.lease_lost = True
            self.cancel = FineTuneJob.objects.filter(pk=self.job_id, cancel_requested=True).exists()
        except DB_ERRORS as exc:
            log.warning("job %s: progress kept for the next flush (database unreachable: %s)", self.job_id, exc)
            with self.lock:
                self.points[:0] = points
                self.pending_events[:0] = events
            close_old_connections()
        self.last_flush = time.monotonic()

    def should_stop(self) -> bool:
        if time.monotonic() - self.last_flush >= self.FLUSH_SECONDS:
            self.flush()
        return self.cancel or self.lease_lost


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Heartbeat(threading.Thread):
    """Keeps the lease fresh while a long step (or evaluation) runs without calling back."""

    def __init__(self, job_id, token):
        super().__init__(daemon=True)
        self.job_id, self.token = job_id, token
        self.stopped = threading.Event()

    def run(self):
        run_every(settings.WORKER_HEARTBEAT_SECONDS / 2, self._touch, self.stopped,
                  f"heartbeat for job {self.job_id}", wait_first=True, log=log)

    def _touch(self):
        FineTuneJob.objects.filter(pk=self.job_id, lease_token=self.token).update(heartbeat_at=timezone.now())

    def stop(self):
        self.stopped.set()


def _db_retry(fn, *args, timeout=DB_WAIT_SECONDS, **kwargs):
    """Calls fn, retrying while the database is unreachable (a restart), for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        try:
            return fn(*args, **kwargs)
        except DB_ERRORS as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("database unreachable (%s); retrying in %.1fs", exc, delay)
            close_old_connections()
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _ping_database():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def wait_for_database(timeout=DB_WAIT_SECONDS):
    _db_retry(_ping_database, timeout=timeout)


def run_training(job_id: int, worker_name: str):
    """Trains one job if its lease can be taken. Safe to call twice for the same job."""
    token = _db_retry(claim_job, job_id, worker_name)
    if token is None:
        log.info("job %s is not claimable by %s (done, cancelled or running elsewhere)", job_id, worker_name)
        return None
    job = FineTuneJob.objects.select_related("base_model", "dataset", "owner").get(pk=job_id)
    Worker.objects.filter(hostname=worker_name).update(current_job=job)
    JobEvent.objects.create(
        job=job, kind="started", message=f"Started on {worker_name} (attempt {job.attempts}).",
    )
    job.phases = _first_phases(job)
    reporter = JobReporter(job, token)
    heartbeat = Heartbeat(job.pk, token)
    heartbeat.start()
    try:
        _replan_for_this_worker(job, worker_name)
        if (job.plan.get("search") or {}).get("enabled") and not job.plan.get("search_result"):
            reporter.begin_phase("searching")
        job = run_search_stage(job, reporter.should_stop, worker_name)  # trials, then the winner's plan
        reporter.begin_phase("loading")
        result = _train(job, reporter)
        if result.status != "cancelled":
            reporter.begin_phase("saving")  # the adapter version is recorded from the trainer's folder
        wait_for_database()  # what is left to write must not be lost to a database restart
        if result.status == "cancelled":
            reporter.end_phases()
        reporter.flush()
        if reporter.lease_lost:
            log.warning("job %s lost its lease; another worker owns it now", job.pk)
            return None
        if result.status == "cancelled":
            _finish(job, token, JobStatus.CANCELLED, metrics=reporter.latest)
            JobEvent.objects.create(job=job, kind="cancelled", message="Cancelled; the last checkpoint is kept.")
            return None
        _succeed(job, token, result, reporter)
    except TunedeckError as exc:
        wait_for_database()
        reporter.end_phases()
        reporter.flush()
        _fail(job, token, str(exc))
    except DB_ERRORS:
        # The database went away for longer than the retries: not the job's fault. Its lease runs out, and a
        # worker's heartbeat requeues it to resume from the last checkpoint.
        log.exception("job %s: database unreachable; left for requeue when its lease expires", job.pk)
        return None
    except Exception as exc:  # noqa: BLE001 - any crash must end with a failed job, not a stuck one
        from finetune.checkpoint import disk_full_message, is_disk_full

        log.exception("job %s crashed", job.pk)
        if is_disk_full(exc):
            message = disk_full_message("the trained adapter", job.checkpoint_dir, exc)
        else:
            message = f"{type(exc).__name__}: {exc}"
        wait_for_database()
        reporter.end_phases()
        _fail(job, token, message, phases=reporter.phases)
    finally:
        heartbeat.stop()
        try:
            Worker.objects.filter(hostname=worker_name, current_job_id=job_id).update(current_job=None)
        except DB_ERRORS as exc:
            log.warning("could not clear the current job of %s: %s", worker_name, exc)
    return job.pk


def _first_phases(job: FineTuneJob) -> list[dict]:
    """This attempt's phases so far: queued since the job was created or last sent back to the queue (the newest
    event before this attempt's "started"), until this worker took it; written with the lease."""
    took = job.started_at or timezone.now()
    last = job.events.filter(created_at__lt=took).exclude(kind="started").order_by("-created_at", "-id").first()
    since = last.created_at if last else job.created_at
    listed = [{"name": "queued", "started_at": since.isoformat(), "ended_at": took.isoformat(), "step": job.step}]
    FineTuneJob.objects.filter(pk=job.pk, lease_token=job.lease_token).update(phases=listed)
    return listed


def _replan_for_this_worker(job: FineTuneJob, worker_name: str):
    """The plan may have been made for another machine (or none: no training worker was alive); the fit check in
    training then measures the plan this worker will really run."""
    from .services.plans import training_queue
    from .services.worker_planning import replan_for_worker, worker_inventory

    replan_for_worker(job, worker_inventory(training_queue()), worker_name)


def _train(job: FineTuneJob, reporter: JobReporter):
    from finetune.train import train

    from .node_join import job_spec
    from .rank_launch import train_on_ranks_for_job, world_size

    out_dir = job.checkpoint_dir / "adapter-out"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    spec = job_spec(job)

    if world_size(job.plan) > 1:  # issue 36: torchrun starts the ranks; rank 0 reports like a one-process run
        return train_on_ranks_for_job(job, spec, reporter)
    return train(spec, on_progress=reporter.on_progress, on_event=reporter.on_event, should_stop=reporter.should_stop)


def _succeed(job, token, result, reporter):
    from .services.version_recording import record_adapter_version

    metrics = _jsonable({**reporter.latest, **(result.metrics or {})})
    plan = _jsonable(result.plan or job.plan)
    version = record_adapter_version(job, result.adapter_dir, metrics, _jsonable(result.generations), plan)
    reporter.end_phases()
    _finish(job, token, JobStatus.SUCCEEDED, metrics=metrics, progress=1.0, plan=plan, phases=reporter.phases)
    JobEvent.objects.create(job=job, kind="succeeded", message=f"Saved as {version.label}.")


def _fail(job, token, message, **fields):
    _finish(job, token, JobStatus.FAILED, error=message, **fields)
    JobEvent.objects.create(job=job, kind="failed", message=message)


def _finish(job, token, status, **fields):
    FineTuneJob.objects.filter(pk=job.pk, lease_token=token).update(
        status=status, finished_at=timezone.now(), heartbeat_at=timezone.now(), **fields
    )
