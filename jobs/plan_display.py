"""What the plan preview shows besides the plan itself: the memory bar (with any overshoot past the device's
capacity), and a training time estimate with what it is based on. Plain reads, no torch."""
from __future__ import annotations

import math

# When no job has run on this base model yet: training a PEFT adapter costs about 6 x parameters FLOPs per
# token (forward, backward through the frozen base); at these sustained rates. Said on the page as an assumption.
ASSUMED_FLOPS = {"cuda": 40e12, "cpu": 0.15e12}


def memory_bars(plan: dict) -> dict:
    """Segments scaled to the larger of capacity and need; used_pct is the need against capacity, uncapped."""
    memory = plan.get("memory") or {}
    capacity = memory.get("capacity_bytes") or 0
    total = memory.get("total_bytes") or 0
    scale = max(capacity, total) or 1
    bars = [
        {"name": name.replace("_", " "), "bytes": value, "width": round(100 * value / scale, 2)}
        for name, value in (memory.get("breakdown") or {}).items()
        if isinstance(value, (int, float)) and value > 0
    ]
    return {
        "bars": bars,
        "capacity": capacity,
        "total": total,
        "used_pct": round(100 * total / capacity, 1) if capacity else None,
        "over": bool(capacity) and total > capacity,
        "over_bytes": max(0, total - capacity),
        "capacity_pct": round(100 * capacity / scale, 2),
    }


def planned_steps(plan: dict, train_rows: int) -> tuple[int, float]:
    """(optimizer steps, epochs actually covered): max_steps stops a run before its epochs when it is smaller."""
    per_step = max(1, int(plan.get("micro_batch") or 1) * int(plan.get("grad_accum") or 1))
    epochs = float(plan.get("epochs") or 1)
    steps_per_epoch = max(1, math.ceil(train_rows / per_step)) if train_rows else 1
    steps = max(1, math.ceil(steps_per_epoch * epochs))
    max_steps = plan.get("max_steps")
    if isinstance(max_steps, (int, float)) and max_steps > 0 and max_steps < steps:
        return int(max_steps), round(max_steps / steps_per_epoch, 2)
    return steps, epochs


def _tokens_per_example(dataset, plan: dict) -> float:
    stats = dataset.token_stats or {}
    typical = stats.get("mean") or stats.get("p50") or plan.get("max_seq_len") or 512
    return min(float(typical), float(plan.get("max_seq_len") or typical))


def measured_speed(base_model, device: str):
    """Tokens per second of the newest finished job on this base model and device kind, if any."""
    from .models import FineTuneJob, JobStatus

    recent = (FineTuneJob.objects.filter(base_model=base_model, status=JobStatus.SUCCEEDED)
              .order_by("-finished_at").values_list("pk", "metrics")[:10])
    for pk, metrics in recent:
        speed = (metrics or {}).get("tokens_per_second")
        ran_on = str((metrics or {}).get("device") or "")
        if isinstance(speed, (int, float)) and speed > 0 and ran_on.startswith(device):
            return float(speed), pk
    return None, None


def time_estimate(plan: dict, dataset, base_model) -> dict | None:
    if dataset is None:
        return None
    steps, epochs = planned_steps(plan, dataset.train_rows)
    per_step = int(plan.get("micro_batch") or 1) * int(plan.get("grad_accum") or 1)
    tokens = steps * per_step * _tokens_per_example(dataset, plan)
    device = "cpu" if str(plan.get("device") or "").startswith("cpu") else "cuda"
    speed, job_id = measured_speed(base_model, device)
    if speed:
        basis = f"{speed:,.0f} tokens/s measured by job #{job_id} on this base model ({device})"
    else:
        parameters = base_model.parameters or 1
        speed = ASSUMED_FLOPS[device] / (6 * parameters)
        basis = (f"an assumed {speed:,.0f} tokens/s: about {ASSUMED_FLOPS[device] / 1e12:g} TFLOP/s sustained "
                 f"on {device.upper() if device == 'cpu' else 'a GPU'} and 6 FLOPs per parameter per token; no job "
                 "has run on this base model yet")
    return {"seconds": tokens / speed, "tokens": int(tokens), "steps": steps, "epochs": epochs, "basis": basis}
