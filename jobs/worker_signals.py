"""Celery worker signal handlers: the heartbeat thread that reports this worker's GPUs and requeues the jobs of
dead workers, and fresh database connections in forked pool processes.

Connected by JobsConfig.ready(), so every process that sets Django up has them; only a worker ever sends these
signals."""
import logging
import socket
import threading

from celery.signals import worker_process_init, worker_ready, worker_shutdown
from django.conf import settings
from django.utils import timezone

from .periodic import run_every

log = logging.getLogger(__name__)


class WorkerHeartbeat(threading.Thread):
    """Reports this worker's GPU inventory and requeues jobs whose worker died."""

    def __init__(self, hostname, queues):
        super().__init__(daemon=True, name="tunedeck-heartbeat")
        self.hostname, self.queues = hostname, queues
        self.stopped = threading.Event()

    def run(self):
        run_every(settings.WORKER_HEARTBEAT_SECONDS, self.beat, self.stopped, "worker heartbeat", log=log)

    def beat(self):
        from .models import Worker
        from .runner import requeue_orphans, resend_queued
        from .services.dataset_processing import recover_stuck_datasets
        from .services.hub_download import recover_stuck_pulls
        from .services.worker_planning import worker_inventory

        Worker.objects.update_or_create(
            hostname=self.hostname,
            defaults={"inventory": worker_inventory(self.queues), "queues": self.queues,
                      "last_heartbeat": timezone.now()},
        )
        requeue_orphans()
        resend_queued()
        recover_stuck_datasets()
        recover_stuck_pulls()  # issue 34: Hub downloads resume on a live worker


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
