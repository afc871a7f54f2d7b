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


def _ranks(plan: dict) -> int:
    """Ranks (GPUs, or CPU processes) sharing each step: grad_accum is per rank (issue 36, autotune/parallel.py)."""
    return max(1, int(plan.get("gpus") or 1))


def planned_steps(plan: dict, train_rows: int) -> tuple[int, float]:
    """(optimizer steps, epochs actually covered): max_steps stops a run before its epochs when it is smaller."""
    per_step = max(1, int(plan.get("micro_batch") or 1) * int(plan.get("grad_accum") or 1) * _ranks(plan))
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
    per_step = int(plan.get("micro_batch") or 1) * int(plan.get("grad_accum") or 1) * _ranks(plan)
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


def method_fields(name: str) -> dict:
    """Which of the plan's fields apply to a method (IA3 has no rank or alpha, prompt tuning no target modules),
    read from the method's own traits."""
    from finetune.methods import get_method

    try:
        method = get_method(name)
    except Exception:  # noqa: BLE001 - an unknown method shows every field rather than breaking the page
        return {"label": name, "rank": True, "targets": True, "virtual_tokens": False}
    return {"label": getattr(method, "label", name) or name, "rank": method.lora_family,
            "targets": method.lora_family or getattr(method, "adapts_layers", False),
            "virtual_tokens": method.virtual_tokens}


def fixed_seconds(base_model) -> float | None:
    """Loading, the fit check and the evaluations as they took on this base model's last runs (None: no run yet)."""
    from . import phases

    costs = phases.measured_costs([base_model.pk]).get(base_model.pk)
    return sum(costs.values()) if costs else None


# An idle worker whose CPUs run other work at this share of its cores or more trains slower there.
LOADED_CPU_SHARE = 0.8


def worker_notes(plan: dict) -> list[str]:
    """What makes the plan's time come later or slower: work ahead in the gpu queue, a GPU another process fills,
    CPUs other work keeps busy (for a plan that trains on the CPU, or a worker without a GPU)."""
    from . import waiting
    from .models import Worker

    notes = []
    line = waiting.line(waiting.GPU)
    running = [w for w in line if w.running]
    if running:
        notes.append(f"The gpu worker is busy now ({len(running)} running, {len(line) - len(running)} waiting): "
                     "this job starts after them.")
    for worker in Worker.objects.filter(queues__contains="gpu", current_job__isnull=True)[:10]:
        if not worker.is_alive():
            continue
        gpus = (worker.inventory or {}).get("gpus") or []
        notes += _gpu_memory_notes(worker, gpus)
        if plan.get("device") == "cpu" or not gpus:
            notes += _cpu_load_notes(worker)
    return notes


def _gpu_memory_notes(worker, gpus: list[dict]) -> list[str]:
    notes = []
    for gpu in gpus:
        total, free = gpu.get("total_bytes") or 0, gpu.get("free_bytes") or 0
        if total and free < 0.7 * total:
            notes.append(f"Another process holds {100 - round(100 * free / total)}% of {gpu.get('name', 'the GPU')}'s "
                         f"memory on {worker.hostname}: the machine is loaded and training may run slower.")
    return notes


def _cpu_load_notes(worker) -> list[str]:
    """The 1-minute load average the worker's heartbeat reports, against its cores (no note when not reported)."""
    cpu = (worker.inventory or {}).get("cpu") or {}
    load, cores = cpu.get("load_1m"), cpu.get("cores") or 1
    if load is None or load < LOADED_CPU_SHARE * cores:
        return []
    return [(f"Other work keeps {worker.hostname}'s CPUs busy (load {load:.1f} on {cores} cores): the machine is "
             "loaded and training may run slower.")]


def summary(plan: dict, dataset, base_model, estimate: dict | None, memory: dict, took: str) -> str:
    """The plan in one plain sentence: what is trained, on what, for how long, and whether it fits."""
    fields = method_fields(plan.get("method") or "")
    what = fields["label"] + (f" (rank {plan['rank']})" if fields["rank"] and plan.get("rank") else "")
    on = f" on {dataset.name} ({dataset.train_rows} training rows)" if dataset is not None else ""
    steps = f" in {estimate['steps']} steps" if estimate else ""
    took = f", {took}" if took else ""
    if memory.get("over"):
        fits = f"; it does not fit: it needs {memory['used_pct']}% of the memory"
    elif memory.get("used_pct") is not None:
        fits = f"; it fits ({memory['used_pct']}% of the memory)"
    else:
        fits = ""
    return f"Trains a {what} adapter for {base_model.name}{on}{steps}{took}{fits}."
