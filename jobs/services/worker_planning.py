"""Worker side of planning: what a worker reports it has (its heartbeat's inventory, with the measured matmul
speed of a training worker), and a job's plan made again for the worker that picked it. Only workers import this
module (jobs/runner.py, jobs/worker_signals.py's heartbeat)."""
from __future__ import annotations

import logging
import os

from django.conf import settings

from .. import limits
from ..models import FineTuneJob, JobEvent
from .plans import make_plan, training_queue

log = logging.getLogger(__name__)


def worker_inventory(queues: str) -> dict:
    """What a worker reports in its heartbeat: the probe, plus (on a worker that trains) its measured bf16 vs fp32
    matmul speed, taken once and kept in the data folder."""
    from autotune import probe

    inventory = probe()
    if hasattr(os, "getloadavg"):  # the plan page says when other work keeps this machine's CPUs busy
        inventory["cpu"]["load_1m"] = round(os.getloadavg()[0], 2)
    if training_queue() in [q.strip() for q in (queues or "").split(",")]:
        try:
            from autotune.precision import matmul_speed

            inventory["matmul_speed"] = matmul_speed(settings.DATA_DIR)
        except Exception as exc:  # noqa: BLE001 - no torch or a broken device: plan without the measurement
            log.warning("matmul speed not measured: %s", exc)
    return inventory



def replan_for_worker(job: FineTuneJob, inventory: dict, hostname: str) -> str | None:
    """Before the fit check: when the job's plan was made for other hardware than this worker's, plans it again
    for this worker, saves the plan and records why. Returns the event's message, or None when the plan stands.
    A job with checkpoints keeps its plan (resuming needs the shapes it was saved with)."""
    from autotune.select import planned_hardware

    planned = (job.plan or {}).get("hardware") or {}
    here = planned_hardware(inventory, job.overrides)
    if not planned or (planned.get("device"), planned.get("name")) == (here["device"], here["name"]):
        return None
    where = f"{planned.get('name')} ({planned.get('device')})"
    if any((job.checkpoint_dir / "checkpoints").glob("*")):
        message = (f"Planned for {where}, but {hostname} has {here['name']}; the plan is kept because the job "
                   f"resumes from a checkpoint saved with it.")
        JobEvent.objects.create(job=job, kind="replan_skipped", message=message, data={"planned": planned, "here": here})
        return message
    old = job.plan
    plan = make_plan(job.base_model, job.dataset, job.method, limits.within_limits(job.overrides), gpu=inventory)
    plan["hardware"]["worker"] = hostname
    changes = [f"{key} {old.get(key)} -> {plan.get(key)}" for key in REPLAN_FIELDS if old.get(key) != plan.get(key)]
    message = (f"Planned for {where}, but {hostname} has {here['name']} ({here['device']}): replanned for it"
               f"{': ' + ', '.join(changes) if changes else ', with the same settings'}.")
    FineTuneJob.objects.filter(pk=job.pk).update(plan=plan)
    job.plan = plan
    JobEvent.objects.create(job=job, kind="replanned", message=message,
                            data={"planned": planned, "here": here, "changes": changes})
    return message


REPLAN_FIELDS = ("method", "device", "dtype", "micro_batch", "grad_accum", "max_seq_len", "gradient_checkpointing",
                 "optimizer", "gpus", "parallel", "global_batch", "quant_storage")
