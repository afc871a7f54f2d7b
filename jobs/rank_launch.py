"""The worker side of a job trained on several ranks (issue 36): torchrun starts them as a process group, rank 0's
progress and events come back through the same reporter a one-process run uses, cancel reaches every rank, and a
rank that dies fails the job naming it (finetune/distributed_launch.py does the work; this module is the job's
view of it). Worker side only: the web process never imports it.
"""
from __future__ import annotations

import socket


def world_size(plan: dict) -> int:
    """The ranks a plan trains on: plan["gpus"] (GPUs, or processes on a CPU), 1 when absent."""
    return max(1, int(plan.get("gpus") or 1))


def train_on_ranks_for_job(job, spec, reporter):
    from finetune.distributed_launch import train_on_ranks

    from .node_join import node_count, train_as_node_zero

    if node_count(job.plan) > 1:  # the ranks span several workers: this one is node 0
        return train_as_node_zero(job, spec, reporter)
    ranks = world_size(job.plan)
    backend = "NCCL" if (job.plan.get("hardware") or {}).get("device") == "cuda" else "gloo"
    how = "the frozen base sharded (FSDP2)" if job.plan.get("parallel") == "fsdp" else "data parallel"
    reporter.on_event(
        "placement",
        f"Training on {ranks} ranks on {socket.gethostname()} ({how}, {backend}, started by torchrun).",
        {"world_size": ranks, "nodes": [{"host": socket.gethostname(), "ranks": list(range(ranks))}],
         "parallel": job.plan.get("parallel", "ddp"), "backend": backend.lower()},
    )
    return train_on_ranks(
        spec, ranks, on_progress=reporter.on_progress, on_event=reporter.on_event,
        should_stop=reporter.should_stop, run_dir=job.checkpoint_dir / "ranks",
    )
