"""A job whose ranks span several workers (issue 36), through torchrun's c10d rendezvous and the job queue.

The worker that claims the job is node 0: it opens the rendezvous (settings.RENDEZVOUS_HOST, a free port or
settings.RENDEZVOUS_PORT), writes the placement (JobNode rows: which worker runs which node and ranks), sends one
join task per other node on the gpu queue and trains its ranks; rank 0 is on node 0 and reports as a one-worker
run does. A joining worker (jobs.tasks.join_job_task) takes a waiting node, runs its torchrun with
`--nnodes N --rdzv-backend c10d --rdzv-endpoint ...` and writes nothing back but its own end (finished, or failed
with the error). Node 0 fails the job when a node fails, stops answering, or is not taken in time; a cancel reaches
every node (each one's ranks agree on it at every micro-batch). Worker side only: the web process never imports it.
"""
from __future__ import annotations

import logging
import re
import socket
import time
from datetime import timedelta

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from finetune.errors import TrainingError, TunedeckError

from . import queue
from .models import FineTuneJob, JobNode, JobStatus, Worker

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0  # how often node 0 reads the placement, and a joined node shows it is alive
# A node's failure seen from another node: its ranks died inside a collective because a fellow went away.
_PEER_WENT_AWAY = re.compile(r"Connection closed by peer|Connection reset|Connection refused|DistBackendError|Socket Timeout|"
                             r"Broken pipe|NCCL communicator was aborted|launcher \(torchrun\) failed", re.IGNORECASE)


def node_count(plan: dict) -> int:
    return max(1, int(plan.get("nodes") or 1))  # as jobs/rank_launch.py reads it (it imports this module)


def world_size(plan: dict) -> int:
    return max(1, int(plan.get("gpus") or 1))


def rendezvous_endpoint() -> str:
    host = settings.RENDEZVOUS_HOST or socket.gethostname()
    port = settings.RENDEZVOUS_PORT or _free_port()
    return f"{host}:{port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rendezvous_id(job: FineTuneJob) -> str:
    return f"tunedeck-job-{job.pk}-attempt-{job.attempts}"  # a fresh rendezvous per attempt


def job_spec(job: FineTuneJob):
    """The TrainSpec a job trains, on one worker (jobs/runner.py) or on every node (the paths must then be the same
    on every host). trust_remote_code: only the model row decides (an admin sets it per model), never a plan."""
    from finetune.train import TrainSpec

    return TrainSpec.from_plan(
        job.plan, base_model_path=job.base_model.path, train_file=job.dataset.train_path,
        eval_file=job.dataset.validation_path or None, output_dir=str(job.checkpoint_dir / "adapter-out"),
        checkpoint_dir=str(job.checkpoint_dir / "checkpoints"), trust_remote_code=job.base_model.trust_remote_code,
    )


# ------------------------------------------------------------------------------------------ node 0


def place_nodes(job: FineTuneJob, worker_name: str, endpoint: str) -> list[JobNode]:
    nodes, per_node = node_count(job.plan), world_size(job.plan) // node_count(job.plan)
    JobNode.objects.filter(job=job).delete()  # a previous attempt's placement
    return JobNode.objects.bulk_create([
        JobNode(job=job, node_rank=k, worker=worker_name if k == 0 else "", rendezvous=endpoint,
                ranks=list(range(k * per_node, (k + 1) * per_node)),
                status=JobNode.JOINED if k == 0 else JobNode.WAITING)
        for k in range(nodes)
    ])


def placement_text(rows) -> str:
    return "; ".join(f"node {r.node_rank} on {r.worker or '(waiting for a worker)'}: ranks {_span(r.ranks)}"
                     for r in rows)


def _span(ranks: list) -> str:
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])


def train_as_node_zero(job: FineTuneJob, spec, reporter):
    from finetune.distributed_launch import train_on_ranks

    endpoint = rendezvous_endpoint()
    rows = place_nodes(job, job.worker, endpoint)
    reporter.on_event("rendezvous", f"Training on {world_size(job.plan)} ranks over {len(rows)} workers, meeting "
                      f"at {endpoint} (c10d); waiting for {len(rows) - 1} more worker(s) to join.",
                      {"rendezvous": endpoint, "nodes": len(rows)})
    for row in rows[1:]:
        queue.send_join(job.pk, row.node_rank)
    watch = NodeWatch(job.pk, reporter)
    try:
        result = train_on_ranks(
            spec, len(rows[0].ranks), on_progress=reporter.on_progress, on_event=reporter.on_event,
            should_stop=watch.should_stop, nnodes=len(rows), rdzv_endpoint=endpoint, rdzv_id=rendezvous_id(job),
            run_dir=job.checkpoint_dir / "ranks", node_rank=0,
        )
    except TrainingError as exc:
        raise TrainingError(watch.cause_of_failure(str(exc))) from exc
    if watch.problem:
        raise TrainingError(watch.problem)
    JobNode.objects.filter(job=job, node_rank=0).update(status=JobNode.FINISHED)
    return result


class NodeWatch:
    """Node 0's view of the other nodes while it trains: a cancel, a failed or silent node, or one no worker took
    in time stops the run (should_stop), and `problem` says why."""

    def __init__(self, job_id: int, reporter):
        self.job_id, self.reporter = job_id, reporter
        self.problem: str | None = None
        self.join_deadline = time.monotonic() + settings.NODE_JOIN_SECONDS
        self.last_check = 0.0
        self.all_joined = False

    def should_stop(self) -> bool:
        if self.reporter.should_stop():
            return True
        if time.monotonic() - self.last_check >= POLL_SECONDS:
            self.last_check = time.monotonic()
            self.check()
        return self.problem is not None

    def check(self) -> list[JobNode]:
        rows = list(JobNode.objects.filter(job_id=self.job_id))
        others = [r for r in rows if r.node_rank]
        self.problem = self.problem or _failed(others) or _silent(others) or self._not_taken(others)
        if not self.all_joined and all(r.status != JobNode.WAITING for r in others):
            self.all_joined = True
            self.reporter.on_event("placement", f"Every node joined: {placement_text(rows)}.",
                                   {"nodes": [{"node": r.node_rank, "worker": r.worker, "ranks": r.ranks}
                                              for r in rows]})
        return rows

    def _not_taken(self, others) -> str | None:
        waiting = [r for r in others if r.status == JobNode.WAITING]
        if not waiting or time.monotonic() < self.join_deadline:
            return None
        return (f"Node {waiting[0].node_rank} (ranks {_span(waiting[0].ranks)}) was not taken by any worker within "
                f"{settings.NODE_JOIN_SECONDS:.0f} s: this job needs {len(others) + 1} free workers on the gpu "
                "queue at once. Start more workers, or ask for fewer nodes, and retry.")

    def cause_of_failure(self, own_error: str) -> str:
        """Node 0's ranks failed. When they failed because a fellow went away, the node that failed or went silent
        is the cause: wait for it to say so (at most a lease's length, when a node died without a word)."""
        if self.problem or not _PEER_WENT_AWAY.search(own_error):
            return self.problem or own_error
        deadline = time.monotonic() + settings.JOB_LEASE_SECONDS + 2 * POLL_SECONDS
        while self.problem is None and time.monotonic() < deadline:
            rows = self.check()
            if self.problem or all(r.status != JobNode.JOINED for r in rows if r.node_rank):
                break
            time.sleep(POLL_SECONDS)
        return self.problem or own_error


def _failed(others) -> str | None:
    failed = [r for r in others if r.status == JobNode.FAILED]
    causes = [r for r in failed if not _PEER_WENT_AWAY.search(r.error)] or failed
    if not causes:
        return None
    node = causes[0]
    return f"Node {node.node_rank} on worker {node.worker} failed: {node.error}"


def _silent(others) -> str | None:
    stale = timezone.now() - timedelta(seconds=settings.JOB_LEASE_SECONDS)
    for node in others:
        if node.status == JobNode.JOINED and node.updated_at < stale:
            return (f"Node {node.node_rank} on worker {node.worker} stopped answering (killed, or its machine went "
                    "away); the other nodes were stopped. Retry resumes from the last checkpoint.")
    return None


# ------------------------------------------------------------------------------------------ a joining worker


def run_join(job_id: int, node_rank: int, worker_name: str) -> str | None:
    """Trains one waiting node of a running job on this worker. Returns the node's end, None when not ours."""
    taken = JobNode.objects.filter(job_id=job_id, node_rank=node_rank, status=JobNode.WAITING,
                                   job__status=JobStatus.RUNNING, job__cancel_requested=False
                                   ).update(status=JobNode.JOINED, worker=worker_name)
    if not taken:
        log.info("node %s of job %s is not waiting for a worker (taken, or the job ended)", node_rank, job_id)
        return None
    node = JobNode.objects.select_related("job__base_model", "job__dataset").get(job_id=job_id, node_rank=node_rank)
    Worker.objects.filter(hostname=worker_name).update(current_job=node.job)
    try:
        status, error = _train_node(node)
    finally:
        Worker.objects.filter(hostname=worker_name, current_job_id=job_id).update(current_job=None)
    JobNode.objects.filter(pk=node.pk, worker=worker_name).update(status=status, error=error)
    return status


def _train_node(node: JobNode) -> tuple[str, str]:
    from finetune.distributed_launch import train_on_ranks

    job = node.job
    try:
        train_on_ranks(job_spec(job), len(node.ranks), should_stop=NodeBeat(node, job.lease_token).should_stop,
                       nnodes=node_count(job.plan), rdzv_endpoint=node.rendezvous, rdzv_id=rendezvous_id(job),
                       run_dir=job.checkpoint_dir / f"ranks-node-{node.node_rank}", node_rank=node.node_rank)
    except TunedeckError as exc:
        return JobNode.FAILED, str(exc)
    except Exception as exc:  # node 0 must hear of any crash, not wait for silence
        log.exception("node %s of job %s crashed", node.node_rank, job.pk)
        return JobNode.FAILED, f"{type(exc).__name__}: {exc}"
    return JobNode.FINISHED, ""


class NodeBeat:
    """A joined node's should_stop: shows node 0 it is alive, and stops when the job is cancelled, ended, or taken
    over by another attempt."""

    def __init__(self, node: JobNode, lease_token: str):
        self.node_id, self.job_id, self.lease_token = node.pk, node.job_id, lease_token
        self.last = 0.0
        self.stop = False

    def should_stop(self) -> bool:
        if time.monotonic() - self.last < POLL_SECONDS:
            return self.stop
        self.last = time.monotonic()
        try:
            JobNode.objects.filter(pk=self.node_id).update(updated_at=timezone.now())
            self.stop = not FineTuneJob.objects.filter(pk=self.job_id, status=JobStatus.RUNNING, cancel_requested=False,
                                                       lease_token=self.lease_token).exists()
        except (OperationalError, InterfaceError) as exc:  # a database restart: keep training, ask again later
            log.warning("node %s: could not read its job (%s)", self.node_id, exc)
        return self.stop
