"""Training plans: the overrides and method a user may give, the hardware a plan is made for (the training
workers' inventory), and make_plan, which asks autotune's selector for the plan, scaled by the memory the fit
checks of earlier jobs measured."""
from __future__ import annotations

from django.conf import settings
from django.utils import timezone

from finetune.chat_templates import chat_template_choice
from finetune.data import LAYOUTS
from finetune.methods import AUTO, auto_method_for_schema, method_plan_fields, schema_problem
from finetune.trainspec import STOPPING_METRICS

from ..base_models import check_usable
from ..errors import InputError
from ..models import METHODS, BaseModel, Dataset, FineTuneJob, Worker
from ..search import SEARCH_OVERRIDES, attach_budget, split_search_options  # issue 20 (search)
from .inputs import json_value

OVERRIDE_TYPES = {
    "rank": int,
    "alpha": float,
    "dropout": float,
    "micro_batch": int,
    "grad_accum": int,
    "max_seq_len": int,
    "gradient_checkpointing": bool,
    "learning_rate": float,
    "epochs": float,
    "max_steps": int,
    "target_modules": list,
    "num_virtual_tokens": int,
    "adapter_bottleneck": int,
    "seed": int,
    "eval_every_steps": int,
    "early_stopping_patience": int,  # 0: train to the end
    "early_stopping_metric": str,  # auto, eval_loss or exact_match (finetune/validation.py)
    "checkpoint_every_steps": int,
    "checkpoint_every_minutes": float,
    "warmup_ratio": float,
    "weight_decay": float,
    "packing": bool,
    "completion_only": bool,
    "device": str,
    "dtype": str,
    "optimizer": str,
    "max_eval_generations": int,
    "max_new_tokens": int,
    "chat_template": str,  # issue 34: a template for a model without one (finetune/chat_templates.py)
    "gpus": int,  # issue 36: the world size (GPUs, or processes on a CPU); autotune/parallel.py
    "nodes": int,  # issue 36: how many workers the ranks span (jobs/rank_launch.py)
}
POSITIVE = {"rank", "micro_batch", "grad_accum", "max_seq_len", "epochs", "max_steps", "num_virtual_tokens",
            "adapter_bottleneck", "learning_rate", "eval_every_steps", "checkpoint_every_steps", "max_new_tokens",
            "gpus", "nodes"}
OVERRIDE_TYPES.update(method_plan_fields())  # each method's own fields: dpo_beta, kto_beta, orpo_beta, ...
OVERRIDE_TYPES.update(SEARCH_OVERRIDES)  # issue 20: search=false, search_minutes, search_trials (jobs/search.py)
POSITIVE |= {"search_minutes", "search_trials"}


def clean_overrides(overrides) -> dict:
    if overrides in (None, ""):
        return {}
    overrides = json_value(overrides, "overrides")
    if not isinstance(overrides, dict):
        raise InputError("overrides must be an object of plan fields.", field="overrides")
    clean = {}
    for key, value in overrides.items():
        if value in (None, ""):
            continue
        kind = OVERRIDE_TYPES.get(key)
        if kind is None:
            raise InputError(
                f"Unknown override {key!r}; known: {', '.join(sorted(OVERRIDE_TYPES))}.", field="overrides"
            )
        clean[key] = _coerce(key, value, kind)
    metric = clean.get("early_stopping_metric")
    if metric is not None and metric not in STOPPING_METRICS:
        raise InputError(f"Override 'early_stopping_metric' must be one of {', '.join(STOPPING_METRICS)}, not "
                         f"{metric!r}.", field="overrides")
    if "chat_template" in clean:
        try:
            clean["chat_template"] = chat_template_choice(clean["chat_template"]) or None
        except ValueError as exc:
            raise InputError(str(exc), field="overrides") from None
        if clean["chat_template"] is None:
            del clean["chat_template"]
    return clean


def _coerce(key, value, kind):
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ValueError
            return value
        if isinstance(value, bool):
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        result = kind(value)
    except (TypeError, ValueError):
        raise InputError(f"Override {key!r} must be {kind.__name__}, not {value!r}.", field="overrides") from None
    if kind in (int, float):
        if result != result or result in (float("inf"), float("-inf")):
            raise InputError(f"Override {key!r} must be a finite number.", field="overrides")
        if key in POSITIVE and result <= 0:
            raise InputError(f"Override {key!r} must be greater than 0.", field="overrides")
        if result < 0:
            raise InputError(f"Override {key!r} must not be negative.", field="overrides")
    return result


def clean_method(method) -> str:
    method = (method or AUTO).strip().lower()
    if method not in [AUTO, *METHODS]:
        raise InputError(f"Unknown method {method!r}; choose auto or one of {', '.join(METHODS)}.", field="method")
    return method


def training_queue() -> str:
    """The Celery queue training jobs are routed to (settings.CELERY_TASK_ROUTES)."""
    route = (settings.CELERY_TASK_ROUTES or {}).get("jobs.tasks.train_job") or {}
    return route.get("queue") or settings.CELERY_TASK_DEFAULT_QUEUE


def consumes_training_queue(worker: Worker) -> bool:
    return training_queue() in [q.strip() for q in (worker.queues or "").split(",")]



def current_inventory() -> tuple[dict, dict]:
    """(inventory, where it came from) for planning a training job: the freshest live worker that consumes the
    training queue; without one, the last one that ever reported; without any, this machine's CPU. The second
    item is {"worker", "source": live | last_known | web_host, "note"}, note being a sentence unless live."""
    workers = [w for w in Worker.objects.order_by("-last_heartbeat")[:50] if w.inventory and consumes_training_queue(w)]
    now = timezone.now()
    live = next((w for w in workers if w.is_alive(now)), None)
    if live is not None:
        return live.inventory, {"worker": live.hostname, "source": "live", "note": ""}
    queue = training_queue()
    if workers:
        last = workers[0]
        seen = last.last_heartbeat.strftime("%Y-%m-%d %H:%M UTC")
        note = (f"No worker consuming the {queue!r} queue is alive: planned for the hardware of {last.hostname}, "
                f"the last training worker seen (at {seen}); the worker that picks the job checks the plan "
                f"against its own hardware and replans if it differs.")
        return last.inventory, {"worker": last.hostname, "source": "last_known", "note": note}
    from autotune import probe

    inventory = probe()
    inventory["gpus"] = []  # the web process is not where training runs
    note = (f"No worker consuming the {queue!r} queue has ever reported: planned for this web host's CPU; the worker "
            f"that picks the job checks the plan against its own hardware and replans if it differs.")
    return inventory, {"worker": "", "source": "web_host", "note": note}


def make_plan(base_model: BaseModel, dataset: Dataset | None, method=AUTO, overrides=None, gpu=None) -> dict:
    from autotune import select

    method = clean_method(method)
    check_usable(base_model)
    overrides, search_options = split_search_options(clean_overrides(overrides))  # issue 20 (search)
    if dataset is not None and dataset.status != Dataset.Status.READY:
        raise InputError(f"Dataset {dataset.name!r} is {dataset.status}, not ready.", field="dataset")
    if dataset is not None:
        _check_method_fits_schema(method, dataset)
    if gpu is not None and not isinstance(gpu, dict):
        raise InputError("gpu must be an inventory object like {\"gpus\": [...]}.", field="gpu")
    if gpu:
        inventory, origin = gpu, {"worker": "", "source": "given", "note": ""}
    else:
        inventory, origin = current_inventory()
    stats = {"rows": dataset.train_rows if dataset else 0, "token_stats": dataset.token_stats if dataset else {},
             "validation_rows": dataset.validation_rows if dataset else None}  # issue 32: 0 = nothing stops a run
    if dataset is not None and method == AUTO:
        method = auto_method_for_schema(training_schema(dataset))  # dpo for pairs, kto for labelled answers
    calibration = measured_calibration(base_model, _device_name(inventory))
    preferences = {"method": method, "overrides": overrides}
    if calibration:
        # Measured over activations plus logits, so it scales both (estimate's calibration keys).
        scale = calibration["activation_scale"]
        preferences["calibration"] = {"activation_scale": scale, "logits_scale": scale}
    try:
        plan = select(inventory, base_model.config, stats, preferences)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"Could not plan for this model: {exc}", field="base_model") from exc
    plan["hardware"] = {**plan.get("hardware", {}), "worker": origin["worker"], "source": origin["source"]}
    if origin["note"]:
        plan["reasons"].insert(0, origin["note"])
    if calibration:
        plan["calibration"] = calibration
        plan.setdefault("reasons", []).append(
            f"Activation and logits memory scaled by {calibration['activation_scale']:.2f}: measured by the fit check of "
            f"{calibration['jobs']} earlier job(s) of this architecture on {calibration['device_name']}."
        )
    return attach_budget(plan, base_model, dataset, search_options, method)  # issue 20 (search): plan["search"]



CALIBRATION_JOBS = 5


def _device_name(inventory: dict) -> str:
    gpus = [g for g in (inventory or {}).get("gpus") or [] if isinstance(g, dict)]
    if not gpus:
        return "cpu"
    return str(max(gpus, key=lambda g: g.get("free_bytes") or 0).get("name") or "")


def measured_calibration(base_model: BaseModel, device_name: str) -> dict | None:
    """How far the estimator's activation memory was off on this (architecture, GPU model) pair, from the fit
    checks of recent jobs: the median of measured/estimated activations, clamped to a sane range."""
    recent = (
        FineTuneJob.objects.filter(
            base_model__architecture=base_model.architecture, metrics__fit_check__device_name=device_name
        )
        .order_by("-created_at")
        .values_list("metrics", "plan")[:CALIBRATION_JOBS]
    )
    scales = []
    for metrics, plan in recent:
        check = (metrics or {}).get("fit_check") or {}
        breakdown = ((plan or {}).get("memory") or {}).get("breakdown") or {}
        dynamic = (breakdown.get("activations") or 0) + (breakdown.get("logits") or 0)
        fixed = sum(v for k, v in breakdown.items() if k not in ("activations", "logits", "allocator_headroom"))
        replanned = bool((plan or {}).get("fit_history"))  # its memory breakdown describes the plan it replaced
        if replanned or not dynamic or not check.get("measured_bytes"):
            continue
        scales.append(max(0.5, min(3.0, (check["measured_bytes"] - fixed) / dynamic)))
    if not scales:
        return None
    scales.sort()
    return {"activation_scale": round(scales[len(scales) // 2], 3), "jobs": len(scales), "device_name": device_name}


def training_schema(dataset) -> str:
    """What the dataset's examples are to training (chat, text, preference, kto): its layout says (a layout such as
    preference_implicit yields preference examples under its own name)."""
    layout = LAYOUTS.get(dataset.schema)
    return layout.yields if layout else dataset.schema


def _check_method_fits_schema(method, dataset):
    """Each method says which training schemas it trains on (finetune/methods/), and what to tell the user."""
    problem = schema_problem(method, training_schema(dataset), dataset.schema)
    if problem:
        raise InputError(problem, field="method")
