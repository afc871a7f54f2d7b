"""Thin Celery tasks: each hands its id to a plain function. The database row, not Celery, holds the status."""
import logging
import socket
import threading

from celery import shared_task
from celery.signals import worker_process_init, worker_ready, worker_shutdown
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from .periodic import run_every

log = logging.getLogger(__name__)


@shared_task(acks_late=True, ignore_result=True)
def process_dataset_task(dataset_id: int):
    from .models import Dataset
    from .services import process_dataset

    close_old_connections()
    try:
        process_dataset(dataset_id)
    except Dataset.DoesNotExist:
        # A message for a dataset deleted meanwhile (or left in the broker from another database): nothing to do.
        log.info("dataset %s no longer exists; skipped", dataset_id)


@shared_task(bind=True, acks_late=True, ignore_result=True)
def train_job(self, job_id: int):
    from .runner import run_training

    close_old_connections()
    run_training(job_id, self.request.hostname or socket.gethostname())


@shared_task(ignore_result=True)
def requeue_orphans_task():
    from .runner import requeue_orphans

    return requeue_orphans()


class WorkerHeartbeat(threading.Thread):
    """Reports this worker's GPU inventory and requeues jobs whose worker died."""

    def __init__(self, hostname, queues):
        super().__init__(daemon=True, name="tunedeck-heartbeat")
        self.hostname, self.queues = hostname, queues
        self.stopped = threading.Event()

    def run(self):
        run_every(settings.WORKER_HEARTBEAT_SECONDS, self.beat, self.stopped, "worker heartbeat", log=log)

    def beat(self):
        from autotune import probe

        from .models import Worker
        from .runner import requeue_orphans, resend_queued

        Worker.objects.update_or_create(
            hostname=self.hostname,
            defaults={"inventory": probe(), "queues": self.queues, "last_heartbeat": timezone.now()},
        )
        requeue_orphans()
        resend_queued()


_heartbeat = None


@worker_ready.connect
def start_worker_heartbeat(sender=None, **kwargs):
    global _heartbeat
    queues = ",".join(q.name for q in sender.app.amqp.queues.consume_from.values()) if sender else ""
    _heartbeat = WorkerHeartbeat(sender.hostname if sender else socket.gethostname(), queues)
    _heartbeat.start()


@worker_shutdown.connect
def stop_worker_heartbeat(**kwargs):
    if _heartbeat is not None:
        _heartbeat.stopped.set()


@worker_process_init.connect
def fresh_connections(**kwargs):
    # A forked pool process must not share the parent's database connection.
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        conn.connection = None


# Tasks that live beside their logic; imported here so the worker, which loads jobs.tasks, registers them.
from .deploy_tasks import deploy_version  # noqa: E402,F401
from .eval_tasks import evaluate_interactive, evaluate_versions_task  # noqa: E402,F401
