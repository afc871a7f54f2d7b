"""Pages. Each looks objects up through the user's own querysets, so another user's ids give 404.

List pages run a fixed number of queries whatever the number of rows (select_related / prefetch_related, and the
queue read once for queue positions: jobs/waiting.py); tests/web/test_monitoring.py holds them to that.
The dataset pages are jobs/dataset_views.py; deployments, search trials, base models and tokens have their own
view modules too (jobs/urls.py lists them)."""
import json
import math
from pathlib import Path

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.cache import cache
from django.core.paginator import Paginator
from django.db.models import Count, Prefetch, Q
from django.http import FileResponse, Http404, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from finetune.chat_templates import CHAT_TEMPLATES
from finetune.units import format_bytes, format_duration

from . import evaluation, phases, plan_display, services, waiting
from .archives import zip_folder
from .compare import compare_versions, prompt_run, version_curve
from .metrics import DEFAULT_POINTS, as_series, downsampled_points, recent_points
from .models import (
    METHODS,
    AdapterLine,
    AdapterVersion,
    BaseModel,
    Dataset,
    Deployment,
    FineTuneJob,
    JobStatus,
    Worker,
)
from .services import InputError
from .versions import (
    VersionInUse,
    delete_version,
    deleted_message,
    kept_deployments,
    owned_versions,
    parse_version_ids,
    set_champion,
)

JOBS_PER_PAGE = 50
INACTIVE_DEPLOYMENT = [Deployment.Status.STOPPED, Deployment.Status.FAILED]
ACTIVE_DEPLOYMENT = ~Q(status__in=INACTIVE_DEPLOYMENT)  # on Deployment


def _timing(job, now, costs=None):
    """Elapsed and remaining seconds of a job: remaining from the step rate measured over its training phase and
    the measured cost of the phases after it (jobs/phases.py); None while nothing is measured yet."""
    if job.status == JobStatus.QUEUED:
        elapsed = (now - job.created_at).total_seconds()
    elif job.started_at:
        elapsed = ((job.finished_at or now) - job.started_at).total_seconds()
    else:
        elapsed = None
    remaining = None
    if job.status == JobStatus.RUNNING and job.phases:
        remaining = phases.remaining_seconds(job, now, costs)
    elif job.status == JobStatus.RUNNING:  # a worker that records no phases: the trainer's own estimate
        eta = (job.metrics or {}).get("eta_seconds")
        remaining = eta if isinstance(eta, (int, float)) and eta >= 0 else None
    return elapsed, remaining


def _decorate_jobs(jobs):
    """Adds display fields to each job; queue positions come from one read of the gpu queue, every user's work in
    it (workers serve everyone in arrival order), made only when the page shows a queued job."""
    jobs = list(jobs)
    now = timezone.now()
    positions = {}
    if any(j.status == JobStatus.QUEUED for j in jobs):
        positions = waiting.job_positions()
    costs = phases.measured_costs({j.base_model_id for j in jobs if j.status == JobStatus.RUNNING})
    for job in jobs:
        elapsed, remaining = _timing(job, now, costs.get(job.base_model_id, {}))
        running = phases.current(job)
        job.phase_label = phases.LABELS.get(running, "") if job.status == JobStatus.RUNNING else ""
        job.elapsed_display = format_duration(elapsed)
        job.remaining_display = format_duration(remaining)
        job.queue_position = positions.get(job.pk)
        job.method_display = (job.plan or {}).get("method") or job.method
        job.progress_pct = round(100 * (job.progress or 0), 1)
    return jobs


@login_required
def dashboard(request):
    user = request.user
    jobs = _decorate_jobs(
        FineTuneJob.objects.owned_by(user).select_related("owner", "dataset", "base_model")[:8]
    )
    counts = dict(
        FineTuneJob.objects.owned_by(user).filter(status__in=FineTuneJob.ACTIVE)
        .values_list("status").annotate(n=Count("id")).values_list("status", "n")
    )
    context = {
        "jobs": jobs,
        "poll_url": reverse("dashboard"),
        "datasets": Dataset.objects.owned_by(user)[:5],
        "versions": AdapterVersion.objects.owned_by(user).select_related("line")[:5],
        "workers": Worker.objects.all()[:10],
        "deployments": Deployment.objects.owned_by(user).select_related("version__line").order_by("-updated_at")[:5],
        "running": counts.get(JobStatus.RUNNING, 0),
        "queued": counts.get(JobStatus.QUEUED, 0),
    }
    context["guide"] = _first_run_guide(user, context)
    if request.htmx:
        return render(request, "jobs/_job_table.html", context)
    return render(request, "jobs/dashboard.html", context)


def _first_run_guide(user, context):
    """Upload -> train -> deploy, ticked off as the user gets there; None once something is deployed."""
    has_deployment = bool(context["deployments"])
    if has_deployment:
        return None
    has_dataset = Dataset.objects.owned_by(user).filter(status=Dataset.Status.READY).exists()
    has_job = bool(context["jobs"])  # the user's latest jobs, already read
    has_version = bool(context["versions"])
    return [
        {"done": has_dataset, "text": "Upload a dataset (JSONL, CSV, Parquet…)", "url": reverse("datasets"),
         "action": "Upload"},
        {"done": has_job, "text": "Train an adapter on it; the plan picks the method and settings for your GPU",
         "url": reverse("job-new"), "action": "New job"},
        {"done": has_version, "text": "Check the adapter version: metrics, generations, compare",
         "url": reverse("versions"), "action": "Adapters"},
        {"done": has_deployment, "text": "Deploy it and chat with it, or call it on the OpenAI-compatible API",
         "url": reverse("deployments"), "action": "Deployments"},
    ]


# ---------------------------------------------------------------- jobs

FORM_OVERRIDES = ("rank", "alpha", "micro_batch", "grad_accum", "max_seq_len", "learning_rate", "epochs", "max_steps",
                  "search", "search_minutes", "search_trials",  # issue 20 (search)
                  "chat_template",  # issue 34: for a model without one
                  "gpus",  # issue 36: the world size (GPUs, or processes on a CPU)
                  "nodes",  # issue 36: how many workers the ranks span (docs/distributed.md)
                  "gradient_checkpointing")
FORM_INPUTS = FORM_OVERRIDES[:-1]  # the fields job_new.html has inputs for; the rest go to "Other overrides"


def _job_form_values(request):
    source = request.POST if request.method == "POST" else request.GET
    overrides = {}
    for key in FORM_OVERRIDES:
        value = source.get(key, "").strip()
        if value:
            overrides[key] = value
    return {
        "base_model": source.get("base_model", ""),
        "dataset": source.get("dataset", ""),
        "method": source.get("method", "auto"),
        "adapter_name": source.get("adapter_name", ""),
        "overrides": overrides,
        "extra_overrides": source.get("extra_overrides", "").strip(),
    }


def _all_overrides(values) -> dict:
    """The form's fields plus the JSON box of other plan overrides (the form's fields win)."""
    extra = {}
    if values.get("extra_overrides"):
        try:
            extra = json.loads(values["extra_overrides"])
        except json.JSONDecodeError as exc:
            raise InputError(f"Other overrides is not valid JSON: {exc.msg}.", field="overrides") from None
        if not isinstance(extra, dict):
            raise InputError('Other overrides must be a JSON object, e.g. {"dropout": 0.1}.', field="overrides")
    return {**extra, **values["overrides"]}


def _form_objects(request, values):
    base_model = (
        BaseModel.visible_to(request.user).get_or_404(values["base_model"])
        if values["base_model"] else services.default_base_model()
    )
    if base_model is None:
        raise InputError("No base model is registered yet.", field="base_model")
    if not values["dataset"]:
        raise InputError("Choose a dataset.", field="dataset")
    dataset = Dataset.objects.owned_by(request.user).get_or_404(values["dataset"])
    return base_model, dataset


def _clone_values(source: FineTuneJob) -> dict:
    overrides = dict(source.overrides or {})
    shown = {k: ("true" if v is True else "false" if v is False else str(v))
             for k, v in overrides.items() if k in FORM_INPUTS}
    extra = {k: v for k, v in overrides.items() if k not in FORM_INPUTS}
    return {"base_model": str(source.base_model_id), "dataset": str(source.dataset_id), "method": source.method,
            "adapter_name": source.adapter_name, "overrides": shown,
            "extra_overrides": json.dumps(extra, sort_keys=True) if extra else ""}


@login_required
def job_new(request):
    values = _job_form_values(request)
    clone_of = request.GET.get("clone")
    cloned = None
    if clone_of and request.method == "GET":
        if not clone_of.isdigit():
            raise Http404
        cloned = FineTuneJob.objects.owned_by(request.user).get_or_404(clone_of)
        values = _clone_values(cloned)
    error = None
    needs_confirmation = None
    if request.method == "POST":
        try:
            base_model, dataset = _form_objects(request, values)
            overrides = _all_overrides(values)
            plan = services.make_plan(base_model, dataset, values["method"], overrides)  # the only plan of the click
            needs_confirmation = _unconfirmed_overshoot(request, plan)
            if needs_confirmation is None:
                job = services.create_job(request.user, base_model, dataset, values["method"], overrides,
                                          values["adapter_name"], plan=plan)
                return redirect("job-detail", pk=job.pk)
            error = needs_confirmation
        except InputError as exc:
            error = str(exc)
    context = {
        "values": values,
        "cloned": cloned,
        "datasets": Dataset.objects.owned_by(request.user).filter(status=Dataset.Status.READY),
        "base_models": BaseModel.ready_for(request.user),  # issue 34: a pull still downloading is not offered
        "methods": ["auto", *METHODS],
        "chat_templates": [(name, label) for name, (label, _) in CHAT_TEMPLATES.items()],  # issue 34
        "error": error,
        "needs_confirmation": needs_confirmation,
    }
    return render(request, "jobs/job_new.html", context, status=400 if error else 200)


def _unconfirmed_overshoot(request, plan):
    """A plan the estimator says cannot fit is queued only when the user ticked "queue it anyway"."""
    if request.POST.get("confirm_overshoot") == "1":
        return None
    if plan.get("fits", True):
        return None
    memory = plan_display.memory_bars(plan)
    total, capacity = format_bytes(memory["total"], missing="–"), format_bytes(memory["capacity"], missing="–")
    return (f"This plan needs about {total} but the worker has {capacity} ({memory['used_pct']}%); "
            "it will most likely run out of memory. "
            "Change the settings, or tick \"Queue it anyway\" and press Train again.")


@login_required
def plan_preview(request):
    """The plan for the form as it stands; htmx swaps it in on every change."""
    values = _job_form_values(request)
    try:
        base_model, dataset = _form_objects(request, values)
        plan = services.make_plan(base_model, dataset, values["method"], _all_overrides(values))
    except (InputError, Http404) as exc:
        return render(request, "jobs/_plan.html", {"plan_error": str(exc) or "Not found."})
    return render(request, "jobs/_plan.html", _plan_context(plan, dataset, base_model))


def _plan_context(plan, dataset, base_model):
    estimate = plan_display.time_estimate(plan, dataset, base_model)
    memory = plan_display.memory_bars(plan)
    fixed = plan_display.fixed_seconds(base_model)
    took = ""
    if estimate and fixed is not None:
        took = f"about {format_duration(estimate['seconds'] + fixed)} with loading and evaluation"
    elif estimate:
        took = f"about {format_duration(estimate['seconds'])} of steps plus loading and evaluation"
    search = (plan.get("search") or {}).get("summary")
    # The selector's own warnings already say what is missing; the page adds no second copy of it, nor of the
    # search paragraph shown above the reasons.
    reasons = [r for r in plan.get("reasons") or [] if not r.startswith("Warning: ") and r != search]
    return {"plan": plan, "memory": memory, "estimate": estimate, "reasons": reasons,
            "estimate_display": format_duration(estimate["seconds"]) if estimate else "",
            "fixed_display": format_duration(fixed) if fixed is not None else "",
            "fields": plan_display.method_fields(plan.get("method") or ""),
            "summary": plan_display.summary(plan, dataset, base_model, estimate, memory, took),
            "notes": plan_display.worker_notes(plan),
            "auto": {k: plan.get(k) for k in FORM_INPUTS}}


@login_required
def job_list(request):
    user = request.user
    wanted = request.GET.get("status", "")
    if wanted not in JobStatus.values:
        wanted = ""
    jobs = FineTuneJob.objects.owned_by(user).select_related("owner", "dataset", "base_model", "adapter_version")
    if wanted:
        jobs = jobs.filter(status=wanted)
    page = Paginator(jobs, JOBS_PER_PAGE).get_page(request.GET.get("page"))
    counts = dict(FineTuneJob.objects.owned_by(user).values_list("status").annotate(n=Count("id"))
                  .values_list("status", "n"))
    query = f"?status={wanted}&page={page.number}" if wanted else f"?page={page.number}"
    context = {
        "jobs": _decorate_jobs(page.object_list),
        "page": page,
        "status": wanted,
        "statuses": [(s, counts.get(s, 0)) for s in JobStatus.values],
        "total": sum(counts.values()),
        "poll_url": reverse("jobs") + query,
    }
    if request.htmx:
        return render(request, "jobs/_job_table.html", context)
    return render(request, "jobs/jobs.html", context)


def _job_context(job):
    now = timezone.now()
    metrics = job.metrics or {}
    elapsed, remaining = _timing(job, now)
    memory = (job.plan or {}).get("memory") or {}
    used, estimate = metrics.get("memory_bytes"), memory.get("total_bytes")
    capacity = memory.get("capacity_bytes")
    scale = max(x for x in (used or 0, estimate or 0, capacity or 0, 1))
    spot = waiting.place(waiting.GPU, f"job:{job.pk}", job.owner) if job.status == JobStatus.QUEUED else None
    log_lines = [line for line in (job.log_tail or "").splitlines() if line.strip()][-40:]
    log_source = "worker"
    if not log_lines:
        log_source = "metrics"
        for p in recent_points(job, 15):
            parts = [f"step {p['step']}" + (f"/{job.total_steps}" if job.total_steps else "")]
            for key, label, fmt in (("train_loss", "loss", "{:.4f}"), ("eval_loss", "eval_loss", "{:.4f}"),
                                    ("learning_rate", "lr", "{:.2e}"), ("grad_norm", "grad_norm", "{:.3f}"),
                                    ("tokens_per_second", "tok/s", "{:.0f}")):
                if p.get(key) is not None:
                    parts.append(f"{label} {fmt.format(p[key])}")
            log_lines.append("  ".join(parts))
    return {
        "job": job,
        "events": recent_events(job),
        "version": AdapterVersion.objects.filter(job=job).select_related("line").first(),
        "elapsed": format_duration(elapsed),
        "remaining": format_duration(remaining),
        "phases": [{**p, "display": format_duration(p["seconds"])} for p in phases.view(job, now)],
        "progress_pct": round(100 * (job.progress or 0), 1),
        "queue_position": spot["position"] if spot else None,
        "memory": {
            "used": used,
            "estimate": estimate,
            "capacity": capacity,
            "used_pct": round(100 * (used or 0) / scale, 1),
            "estimate_pct": round(100 * (estimate or 0) / scale, 1),
            "ratio": round(used / estimate, 2) if used and estimate else None,
        },
        "fit_check": _fit_check_view(metrics.get("fit_check")),
        "waiting": spot,
        "train_loss": _train_loss_tile(job, metrics),
        "steps_plan": _steps_plan(job),
        "resumable": bool(job.started_at) and (job.step or 0) > 0,
        "log_lines": log_lines,
        "log_source": log_source,
        "poll_ms": 1000 if job.status == JobStatus.RUNNING else 2000,
    }


def _train_loss_tile(job, metrics):
    """While training the trainer reports the last step's loss; the finished run stores the smoothed run loss
    (and the last step's as final_step_loss). The tile says which one it shows."""
    if job.status == JobStatus.SUCCEEDED and metrics.get("final_step_loss") is not None:
        return {"label": "Train loss (smoothed over the run)", "value": metrics.get("train_loss"),
                "last": metrics.get("final_step_loss")}
    return {"label": "Train loss (last step)", "value": metrics.get("train_loss"), "last": None}


def _steps_plan(job):
    """Epochs as the plan asked and as max_steps lets them run: "3 epochs" with max_steps 10 is 0.3 epoch."""
    plan = job.plan or {}
    steps, epochs = plan_display.planned_steps(plan, job.dataset.train_rows if job.dataset_id else 0)
    return {"steps": job.total_steps or steps, "epochs": epochs, "planned_epochs": plan.get("epochs"),
            "cut_by_max_steps": bool(plan.get("max_steps")) and epochs != plan.get("epochs")}


# Evaluations and checkpoints come every few steps; on a fast machine dozens land in seconds, so they get
# their own short window and never push the job's milestones (started, warnings, stopped) out of view.
ROUTINE_EVENT_KINDS = ("evaluated", "checkpoint")


def recent_events(job, milestones=30, routine=10):
    newest_first = ("-created_at", "-id")
    events = list(job.events.exclude(kind__in=ROUTINE_EVENT_KINDS).order_by(*newest_first)[:milestones])
    events += job.events.filter(kind__in=ROUTINE_EVENT_KINDS).order_by(*newest_first)[:routine]
    return sorted(events, key=lambda e: (e.created_at, e.id), reverse=True)


def _fit_check_view(check):
    """The fit check the trainer ran before its first step: the worst micro-batch measured against the plan."""
    if not isinstance(check, dict):
        return None
    estimated, measured = check.get("estimated_bytes"), check.get("measured_bytes")
    return {
        **check,
        "ratio": round(measured / estimated, 2) if measured and estimated else None,
        "verdict": "fits" if check.get("fits", True) else "did not fit",
    }


@login_required
def job_detail(request, pk):
    job = FineTuneJob.objects.owned_by(request.user).select_related("owner", "dataset", "base_model").get_or_404(pk)
    context = _job_context(job)
    if request.htmx:
        return render(request, "jobs/_job_live.html", context)
    from .search import trials_payload  # issue 20 (search)

    context["search"] = trials_payload(job)
    context["plan_fields"] = plan_display.method_fields((job.plan or {}).get("method") or job.method)
    return render(request, "jobs/job_detail.html", context)


@login_required
@require_GET
def job_metrics_json(request, pk):
    """The chart series, downsampled in SQL (fast with 100k points); the page's charts poll this."""
    job = FineTuneJob.objects.owned_by(request.user).get_or_404(pk)
    try:
        max_points = max(10, min(5000, int(request.GET.get("max_points", DEFAULT_POINTS))))
    except ValueError:
        return JsonResponse({"error": {"code": "invalid", "message": "max_points must be a whole number.",
                                       "details": {"field": "max_points"}}}, status=400)
    # The series only change when the worker reports a step, so (step, status) keys them: several tabs and
    # the page's polls share one computation, and a finished job's chart is computed once.
    key = f"job-series:{job.pk}:{max_points}:{job.step}:{job.status}:{job.attempts}"
    points = cache.get(key)
    if points is None:
        points = downsampled_points(job, max_points)
        cache.set(key, points, timeout=None if not job.is_active else 60)
    response = JsonResponse({
        "job": job.pk,
        "status": job.status,
        "active": job.is_active,
        "step": job.step,
        "total_steps": job.total_steps,
        "progress": job.progress,
        "count": len(points),
        "series": as_series(points),
        "plan_memory_bytes": ((job.plan or {}).get("memory") or {}).get("total_bytes"),
    })
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def job_cancel(request, pk):
    job = FineTuneJob.objects.owned_by(request.user).get_or_404(pk)
    services.request_cancel(job)
    if request.htmx:
        return job_detail(request, pk)
    return redirect("job-detail", pk=pk)


@login_required
@require_POST
def job_retry(request, pk):
    job = FineTuneJob.objects.owned_by(request.user).get_or_404(pk)
    try:
        services.retry_job(job)
    except InputError as exc:
        messages.error(request, str(exc))
    if request.htmx:
        return job_detail(request, pk)
    return redirect("job-detail", pk=pk)


# ---------------------------------------------------------------- adapter versions


@login_required
def version_list(request):
    versions = (
        AdapterVersion.objects.select_related("base_model", "dataset")
        .annotate(active_deployments=Count("deployments", filter=~Q(deployments__status__in=INACTIVE_DEPLOYMENT)))
        .order_by("-version")
    )
    lines = (
        AdapterLine.objects.owned_by(request.user)
        .prefetch_related(Prefetch("versions", queryset=versions, to_attr="version_list"))
        .order_by("name")
    )
    return render(request, "jobs/versions.html", {"lines": lines})


def _scalar_metrics(metrics):
    from .compare import _metric_sort_key  # the compare page's order: the quality metrics first

    rows = []
    for key, value in sorted((metrics or {}).items(), key=lambda kv: _metric_sort_key(kv[0])):
        if key == "evaluation" or isinstance(value, (dict, list)):
            continue
        rows.append({"name": key, "value": value, "is_float": isinstance(value, float)})
    return rows


def _evaluation_view(version, set_id=None):
    """The version's evaluation on one prompt set (the latest by default), rows zipped with the baseline."""
    ev = evaluation.evaluation_of(version)
    set_id = set_id or ev.get("latest")
    entry = ev["sets"].get(set_id) if set_id else None
    if not entry:
        return None
    baseline = entry.get("baseline") or {}
    results, base_results = entry.get("results") or [], baseline.get("results") or []
    rows = []
    for i, prompt in enumerate(entry.get("prompts") or []):
        rows.append({"prompt": prompt, "output": results[i] if i < len(results) else None,
                     "baseline": base_results[i] if i < len(base_results) else None})
    initial = (version.metrics or {}).get("initial_eval_loss")  # the base model's loss, measured before training
    return {"set_id": set_id, "entry": entry, "rows": rows, "baseline": baseline,
            "baseline_loss": initial if isinstance(initial, (int, float)) else None,
            "baseline_perplexity": math.exp(min(initial, 50)) if isinstance(initial, (int, float)) else None,
            "active": evaluation.is_active(entry),
            "waiting": _evaluation_waiting(entry, set_id, version.owner),
            "sets": [{"id": k, "name": e.get("name"), "status": e.get("status")}
                     for k, e in ev["sets"].items() if e.get("kind") != "prompt"]}


def _evaluation_waiting(entry, set_id, user):
    """Where a queued evaluation stands in its queue (None once it runs or is done)."""
    if (entry or {}).get("status") != "queued":
        return None
    key = f"evaluation:{set_id}:{entry.get('queued_at')}"
    return waiting.place(entry.get("queue") or waiting.GPU, key, user)


@login_required
def version_detail(request, pk):
    version = (AdapterVersion.objects.owned_by(request.user)
               .select_related("owner", "line", "base_model", "dataset", "job").get_or_404(pk))
    shown_evaluation = _evaluation_view(version, request.GET.get("set"))
    if request.htmx and request.GET.get("part") == "evaluation":
        return render(request, "jobs/_version_evaluation.html", {"version": version, "evaluation": shown_evaluation})
    return render(request, "jobs/version_detail.html", _version_context(version, shown_evaluation))


def _version_context(version, shown_evaluation, *, form=None):
    lineage = version.lineage or {}
    siblings = list(version.line.versions.order_by("-version").values("pk", "version"))
    entry = (shown_evaluation or {}).get("entry") or {}
    if form is None:  # the evaluation form shows the prompts of the set on screen when they were typed
        form = {"prompts": _prompt_lines(entry.get("prompts")) if entry.get("kind") == "custom" else "",
                "max_new_tokens": entry.get("max_new_tokens") or evaluation.DEFAULT_NEW_TOKENS}
    deployments = list(version.deployments.filter(ACTIVE_DEPLOYMENT))
    return {
        "version": version,
        "is_champion": version.line.champion_id == version.pk,
        "lineage": lineage,
        "libraries": sorted((lineage.get("libraries") or {}).items()),
        "metric_rows": _scalar_metrics(version.metrics),
        "evaluation": shown_evaluation,
        "eval_form": form,
        "deployments": deployments,
        "deploy_name": deployments[0].name if deployments else _default_deploy_name(version),
        "siblings": siblings,
        "compare_ids": ",".join(str(s["pk"]) for s in siblings[:4]) if len(siblings) > 1 else "",
        "plan_json": json.dumps(version.plan, indent=2, sort_keys=True),
        "curves": [_curve_for_chart(version)],
    }


def _default_deploy_name(version):
    """The name Deploy would pick: the user's deployment of this line, else the line's name made URL-safe."""
    existing = (Deployment.objects.filter(owner_id=version.owner_id, version__line_id=version.line_id)
                .order_by("-updated_at").values_list("name", flat=True).first())
    if existing:
        return existing
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", version.line.name).strip("-.")[:80] or "model"


def _prompt_lines(prompts) -> str:
    lines = []
    for p in prompts or []:
        text = (p.get("prompt") or "").replace("\n", " ")
        lines.append(f"{text} ||| {p['reference']}" if p.get("reference") else text)
    return "\n".join(lines)


def _curve_json(label, points):
    """One version's loss curve in the shape charts.js overlays (data-compare-chart)."""
    return {"label": label, "steps": [p["step"] for p in points],
            "train_loss": [p.get("train_loss") for p in points],
            "eval_loss": [p.get("eval_loss") for p in points],
            "learning_rate": [p.get("learning_rate") for p in points]}


def _curve_for_chart(version):
    return _curve_json(version.label, version_curve(version))


@login_required
def version_download(request, pk):
    version = AdapterVersion.objects.owned_by(request.user).select_related("line").get_or_404(pk)
    folder = Path(version.path)
    if not folder.is_dir():
        raise Http404("The adapter files are missing on the server.")
    filename = f"{version.line.name}-v{version.version}.zip".replace("/", "_").replace('"', "")
    return FileResponse(zip_folder(folder), as_attachment=True, filename=filename, content_type="application/zip")


@login_required
@require_POST
def version_champion(request, pk):
    version = AdapterVersion.objects.owned_by(request.user).select_related("line").get_or_404(pk)
    unset = request.POST.get("unset") == "1"
    set_champion(version, unset=unset)
    messages.success(request, f"{version.label} is no longer the champion." if unset
                     else f"{version.label} is now the champion of {version.line.name}.")
    return redirect("version-detail", pk=pk)


@login_required
def version_delete(request, pk):
    version = (AdapterVersion.objects.owned_by(request.user)
               .select_related("line", "base_model", "dataset").get_or_404(pk))
    blocking = list(version.deployments.filter(ACTIVE_DEPLOYMENT))
    if request.method == "POST":
        if request.POST.get("confirm") != version.label:
            messages.error(request, f"Type {version.label} to confirm.")
        else:
            try:
                kept = delete_version(version)
            except VersionInUse as exc:
                messages.error(request, str(exc))
            else:
                messages.success(request, deleted_message(version, kept))
                return redirect("versions")
        blocking = list(version.deployments.filter(ACTIVE_DEPLOYMENT))
    return render(request, "jobs/version_delete.html", {"version": version, "blocking": blocking,
                                                        "kept": kept_deployments(version)},
                  status=409 if (request.method == "POST" and blocking) else 200)


def _versions_from_ids(request, raw_ids, *, at_least=1):
    ids = parse_version_ids(raw_ids, at_least=at_least, action="compare")
    return owned_versions(request.user, ids, "line", "base_model", "dataset")


@login_required
@require_POST
def version_evaluate(request, pk):
    version = AdapterVersion.objects.owned_by(request.user).select_related("line", "dataset").get_or_404(pk)
    raw = request.POST.get("prompts", "")
    try:
        new_tokens = evaluation.clean_new_tokens(request.POST.get("max_new_tokens"))
        typed = evaluation.prompt_lines(raw)
        prompts, name, kind = evaluation.choose_prompts(version, typed)
        set_id = evaluation.queue_evaluation([version], prompts, name=name, kind=kind, max_new_tokens=new_tokens,
                                             force=request.POST.get("force") == "1")
    except InputError as exc:
        # The page again, with what was typed still in the form and the problem above it.
        messages.error(request, str(exc))
        form = {"prompts": raw, "max_new_tokens": request.POST.get("max_new_tokens", "")}
        context = _version_context(version, _evaluation_view(version), form=form)
        return render(request, "jobs/version_detail.html", context, status=400)
    return redirect(reverse("version-detail", args=[pk]) + f"?set={set_id}#evaluation")


@login_required
def compare_page(request):
    try:
        versions = _versions_from_ids(request, request.GET.getlist("ids"), at_least=2)
    except InputError as exc:
        return render(request, "jobs/compare.html", {"error": str(exc)}, status=400)
    versions.sort(key=lambda v: (v.line.name, v.version))  # v1 left of v2, whatever order they were ticked in
    # Opening the page starts nothing: a full evaluation is queued only when asked for (below the table), so
    # the page's own prompt box never finds a job it did not ask for ahead of it.
    polling_evaluation = bool(request.htmx and request.GET.get("part") == "evaluation")
    data = compare_versions(versions, request.GET.get("set") or None, curves=not polling_evaluation)
    if data["evaluation"]:
        data["evaluation"]["waiting"] = _evaluation_waiting(
            evaluation.entry_of(versions[0], data["evaluation"]["set_id"]), data["evaluation"]["set_id"], request.user)
    ids = ",".join(str(v.pk) for v in versions)
    if polling_evaluation:
        return render(request, "jobs/_compare_evaluation.html", {"data": data, "ids": ids, "versions": versions})
    curves = [_curve_json(v["label"], v["curve"]) for v in data["versions"]]
    shown = data["evaluation"] or {}
    typed = _prompt_lines([{"prompt": r["prompt"], "reference": r["reference"]} for r in shown.get("rows") or []]) \
        if shown.get("kind") == "custom" else ""
    return render(request, "jobs/compare.html", {
        "data": data, "versions": versions, "ids": ids, "curves": curves,
        "columns": len(versions) + 1, "typed_prompts": typed,
    })


@login_required
@require_POST
def compare_evaluate(request):
    try:
        versions = _versions_from_ids(request, request.POST.getlist("ids"), at_least=2)
        new_tokens = evaluation.clean_new_tokens(request.POST.get("max_new_tokens"))
        typed = evaluation.prompt_lines(request.POST.get("prompts", ""))
        prompts, name, kind = evaluation.choose_prompts(versions[0], typed)
        set_id = evaluation.queue_evaluation(versions, prompts, name=name, kind=kind, max_new_tokens=new_tokens)
    except InputError as exc:
        messages.error(request, str(exc))
        return redirect(reverse("versions-compare") + "?ids=" + ",".join(request.POST.getlist("ids")))
    ids = ",".join(str(v.pk) for v in versions)
    return redirect(reverse("versions-compare") + f"?ids={ids}&set={set_id}#evaluation")


@login_required
def compare_prompt(request):
    """POST: runs one new prompt against every compared version and the base model (queued on a worker).
    GET ?set=: the result so far; the fragment polls itself until every column has its answer."""
    source = request.POST if request.method == "POST" else request.GET
    try:
        versions = _versions_from_ids(request, source.getlist("ids"), at_least=1)
        if request.method == "POST":
            prompts = evaluation.clean_prompts([{"prompt": request.POST.get("prompt", ""),
                                                 "reference": request.POST.get("reference") or None}])
            new_tokens = evaluation.clean_new_tokens(request.POST.get("max_new_tokens"))
            set_id = evaluation.queue_evaluation(versions, prompts, name="prompt box", kind="prompt",
                                                 max_new_tokens=new_tokens)
            for v in versions:  # queue_evaluation wrote the queued entries to fresh copies of the rows
                v.refresh_from_db(fields=["metrics"])
        else:
            set_id = request.GET.get("set", "")
    except InputError as exc:
        return render(request, "jobs/_compare_prompt.html", {"error": str(exc)}, status=400)
    run = prompt_run(versions, set_id)
    if run is None:
        raise Http404("No such prompt run.")
    run["waiting"] = _evaluation_waiting(evaluation.entry_of(versions[0], set_id), set_id, request.user)
    return render(request, "jobs/_compare_prompt.html", {
        "run": run, "versions": versions, "ids": ",".join(str(v.pk) for v in versions),
        "columns": list(zip(versions, run["outputs"], run["errors"], run["statuses"])),
    })


# ---------------------------------------------------------------- workers (the tokens page: jobs/token_views.py)


@login_required
def worker_list(request):
    now = timezone.now()
    workers = list(Worker.objects.select_related("current_job"))
    busy = waiting.busy_workers()  # evaluations and merges running now, by worker
    for w in workers:
        w.alive = w.is_alive(now)
        w.silent_for = format_duration((now - w.last_heartbeat).total_seconds())
        w.gpu_rows = []
        for gpu in (w.inventory or {}).get("gpus") or []:
            total, free = gpu.get("total_bytes") or 0, gpu.get("free_bytes")
            used = total - free if (total and free is not None) else None
            w.gpu_rows.append({**gpu, "used_bytes": used,
                               "used_pct": round(100 * used / total, 1) if used is not None and total else None})
        w.job_is_mine = bool(w.current_job and w.current_job.owner_id == request.user.pk)
        w.other_work = [item.describe(request.user) for item in busy.get(w.hostname, [])]
    template = "jobs/_workers_table.html" if request.htmx else "jobs/workers.html"
    return render(request, template, {"workers": workers, "heartbeat_seconds": _heartbeat_seconds()})


def _heartbeat_seconds():
    from django.conf import settings

    return settings.WORKER_HEARTBEAT_SECONDS


def healthz(request):
    return HttpResponse("ok", content_type="text/plain")


def reverse_job(job):
    return reverse("job-detail", args=[job.pk])
