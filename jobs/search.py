"""The search stage of a training job (issue 20), web side: the budget on the plan and the trials as the page and
the API show them. The study itself is autotune/search.py; running it on the workers is
jobs/services/search_stage.py (worker side: the web process never imports it).

- make_plan calls attach_budget: plan["search"] says, before Train is clicked, what the final training should
  take and what the search may take (search_* overrides: search=false skips it, search_minutes, search_trials).
- The job's own training task calls run_search_stage before training: it sends helper tasks to the other live
  training workers (each runs trials of the same study, stored with optuna's RDBStorage in the project's
  database), runs trials itself, waits for the helpers' trials, fails trials whose worker stopped answering,
  and writes the winner into job.plan (plan["search_result"] marks the stage as done, so a retry or a requeue
  goes straight to the final training).
- Every trial is a SearchTrial row, kept up to date while it runs (a heartbeat), shown on the job page and at
  GET /api/v1/jobs/<id>/trials.
"""
from __future__ import annotations

import statistics

from autotune import search

from . import limits
from .models import FineTuneJob, JobStatus, SearchTrial

SEARCH_OVERRIDES = {"search": bool, "search_minutes": float, "search_trials": int}
HISTORY_JOBS = 5
# Tokens per second a device sustains per 1e9 FLOPs of (4 x parameters) per token, when no earlier job measured it:
# LoRA training costs about 4 x parameters FLOPs per token (no weight gradients for the frozen base).
ASSUMED_FLOPS = {"cpu": 1e11, "cuda": 1e14}


# ------------------------------------------------------------------------ the budget, on the plan


def split_search_options(overrides: dict) -> tuple[dict, dict]:
    """(plan overrides, search options): the search_* keys are not plan fields for autotune. A budget over the
    operator's limits (jobs/limits.py) is refused here, so the plan preview says so before Train is clicked."""
    options = {k: overrides[k] for k in SEARCH_OVERRIDES if k in overrides}
    limits.refuse_over_limit(options)
    return {k: v for k, v in overrides.items() if k not in SEARCH_OVERRIDES}, options


def attach_budget(plan: dict, base_model, dataset, options: dict, method: str = "auto") -> dict:
    """Adds plan["search"] (the budget in words and numbers) and its summary as the plan's last reason."""
    if dataset is None:
        return plan
    tps, source = tokens_per_second(base_model, plan)
    stats = dataset.token_stats or {}
    enabled = options.get("search")
    if enabled is not False and not dataset.validation_rows:
        enabled = False
    budget = search.plan_budget(plan, rows=int(dataset.train_rows or 0),
                                mean_tokens=float(stats.get("mean") or stats.get("p50") or 0),
                                tokens_per_second=tps, source=source, minutes=options.get("search_minutes"),
                                trials=options.get("search_trials"), enabled=enabled,
                                # on by default for the auto path; a chosen method searches when asked to
                                on_by_default=method == "auto")
    if options.get("search") is not False and not dataset.validation_rows:
        budget["summary"] += " (The dataset has no validation rows to score trials on.)"
    plan["search"] = limits.cap_budget(budget)
    plan.setdefault("reasons", []).append(budget["summary"])
    return plan


def tokens_per_second(base_model, plan: dict) -> tuple[float | None, str]:
    """Measured by the last jobs of this base model on this kind of device, else a rough figure from its size."""
    device = plan.get("device") or "cpu"
    measured = [
        (m or {}).get("tokens_per_second")
        for m in FineTuneJob.objects.filter(base_model=base_model, status=JobStatus.SUCCEEDED, plan__device=device)
        .order_by("-finished_at").values_list("metrics", flat=True)[:HISTORY_JOBS]
    ]
    measured = [float(v) for v in measured if isinstance(v, (int, float)) and v > 0]
    if measured:
        return statistics.median(measured), (f"measured (median of the last {len(measured)} job(s) of this model " \
                                            f"on {device})")
    params = int(base_model.parameters or 0) if hasattr(base_model, "parameters") else 0
    if not params:
        return None, "unknown"
    return ASSUMED_FLOPS.get(device, ASSUMED_FLOPS["cpu"]) / (4 * params), \
        f"assumed from the model's size (no earlier job of this model on {device} to measure it)"


def search_pending(job: FineTuneJob) -> bool:
    plan = job.plan or {}
    return bool((plan.get("search") or {}).get("enabled")) and "search_result" not in plan


# ------------------------------------------------------------------------ what the page and the API show


def trials_payload(job: FineTuneJob) -> dict:
    """The job's search as the REST API and the page's chart read it."""
    plan = job.plan or {}
    budget = plan.get("search") or {}
    result = plan.get("search_result") or {}
    trials = [
        {"number": t.number, "params": t.params, "state": t.state, "score": t.score, "metric": t.metric,
         "curve": t.curve, "duration": round(t.duration, 2), "reason": t.reason, "worker": t.worker,
         "winner": t.winner}
        for t in SearchTrial.objects.filter(job=job)
    ]
    return {"job": job.pk, "active": job.is_active, "enabled": bool(budget.get("enabled")),
            "budget": {k: budget.get(k) for k in ("summary", "seconds", "max_trials", "expected_trials",
                                                   "trial_steps", "final_seconds_estimate", "tokens_per_second",
                                                   "tokens_per_second_source")},
            "done": bool(result), "winner": result.get("winner"), "trials": trials}
