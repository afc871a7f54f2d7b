"""Which training workers a base model fits on, and for which method: autotune's selector run on the model's
config.json (known before a Hub download finishes) against each live training worker's reported inventory."""
from __future__ import annotations

from django.utils import timezone

from .models import BaseModel, Worker
from .services.plans import consumes_training_queue

FIT_METHODS = ("lora", "qlora", "dora")
MAX_WORKERS = 8


def training_workers() -> list[Worker]:
    now = timezone.now()
    workers = Worker.objects.order_by("hostname")[:50]
    return [w for w in workers if w.inventory and consumes_training_queue(w) and w.is_alive(now)][:MAX_WORKERS]


def worker_fits(model: BaseModel, workers: list[Worker]) -> list[dict]:
    """[{"worker", "device", "methods": [methods that fit]}] for each worker; empty without a config."""
    from autotune import select

    if not model.config or not model.config.get("model_type"):
        return []
    fits = []
    for worker in workers:
        methods = []
        for method in FIT_METHODS:
            try:
                plan = select(worker.inventory, model.config, {}, {"method": method})
            except (ValueError, KeyError, TypeError):
                continue
            if plan.get("fits") and plan.get("method") == method:
                methods.append(method)
        fits.append({"worker": worker.hostname.split("@")[-1], "device": (_device(worker.inventory)),
                     "methods": methods})
    return fits


def _device(inventory: dict) -> str:
    gpus = [g for g in inventory.get("gpus") or [] if isinstance(g, dict)]
    return str(gpus[0].get("name") or "GPU") if gpus else "CPU"
