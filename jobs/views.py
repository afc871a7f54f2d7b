"""Pages. Each looks objects up through the user's own querysets, so another user's ids give 404.

List pages run a fixed number of queries whatever the number of rows (select_related / prefetch_related and one
query for queue positions); tests/web/test_monitoring.py holds them to that."""
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

from . import evaluation, services
from .archives import zip_folder
from .compare import compare_versions, prompt_run, version_curve
from .metrics import DEFAULT_POINTS, as_series, downsampled_points, recent_points
from .models import (
    METHODS,
    AdapterLine,
    AdapterVersion,
    ApiToken,
    BaseModel,
    Dataset,
    Deployment,
    FineTuneJob,
    JobStatus,
    Worker,
)
from .services import SCHEMAS, InputError
from .versions import VersionInUse, delete_version, owned_versions, parse_version_ids, set_champion

JOBS_PER_PAGE = 50
INACTIVE_DEPLOYMENT = [Deployment.Status.STOPPED, Deployment.Status.FAILED]
ACTIVE_DEPLOYMENT = ~Q(status__in=INACTIVE_DEPLOYMENT)  # on Deployment


def format_duration(seconds) -> str:
    """3s, 4m 05s, 2h 03m, 3d 4h."""
    if seconds is None or not isinstance(seconds, (int, float)) or math.isnan(seconds):
        return ""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {(s % 3600) // 60:02d}m"
    return f"{s // 86400}d {(s % 86400) // 3600}h"


def _timing(job, now):
    """Elapsed and remaining seconds of a job, from its timestamps and the trainer's eta_seconds."""
    if job.status == JobStatus.QUEUED:
        elapsed = (now - job.created_at).total_seconds()
    elif job.started_at:
        elapsed = ((job.finished_at or now) - job.started_at).total_seconds()
    else:
        elapsed = None
    remaining = None
    if job.status == JobStatus.RUNNING:
        eta = (job.metrics or {}).get("eta_seconds")
        if isinstance(eta, (int, float)) and eta >= 0:
            remaining = eta
    return elapsed, remaining


def _decorate_jobs(jobs):
    """Adds display fields to each job; queue positions come from one query over the queued jobs of all users
    (workers serve everyone in arrival order), run only when the page shows a queued job."""
    jobs = list(jobs)
    now = timezone.now()
    positions = {}
    if any(j.status == JobStatus.QUEUED for j in jobs):
        queued = FineTuneJob.objects.filter(status=JobStatus.QUEUED).order_by("created_at", "id")
        positions = {pk: i + 1 for i, pk in enumerate(queued.values_list("pk", flat=True))}
    for job in jobs:
        elapsed, remaining = _timing(job, now)
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
        "running": counts.get(JobStatus.RUNNING, 0),
        "queued": counts.get(JobStatus.QUEUED, 0),
    }
    if request.htmx:
        return render(request, "jobs/_job_table.html", context)
    return render(request, "jobs/dashboard.html", context)


# ---------------------------------------------------------------- datasets


@login_required
def dataset_list(request):
    error = None
    if request.method == "POST":
        error = getattr(request, "upload_refused", None)
        if not error:
            try:
                base_model = None
                if request.POST.get("base_model"):
                    base_model = BaseModel.visible_to(request.user).get_or_404(request.POST["base_model"])
                dataset, created = services.create_dataset(
                    request.user,
                    request.FILES.get("file"),
                    name=request.POST.get("name", ""),
                    base_model=base_model,
                    validation_file=request.FILES.get("validation_file"),
                    validation_fraction=request.POST.get("validation_fraction"),
                    schema=request.POST.get("schema", ""),
                    column_map=request.POST.get("column_map", ""),
                )
                if not created and request.POST.get("name", "").strip():
                    messages.info(request, "This file was uploaded before with the same settings; reusing it "
                                           "under the new name.")
                    return redirect("dataset-detail", pk=dataset.pk)
                if not created:
                    messages.info(request, "This file was uploaded before with the same settings; reusing it.")
                return redirect("dataset-detail", pk=dataset.pk)
            except InputError as exc:
                error = str(exc)
    context = {
        "datasets": Dataset.objects.owned_by(request.user).select_related("base_model"),
        "base_models": BaseModel.visible_to(request.user),
        "schemas": SCHEMAS,
        "error": error,
    }
    return render(request, "jobs/datasets.html", context, status=400 if error else 200)


@login_required
def dataset_detail(request, pk):
    dataset = Dataset.objects.owned_by(request.user).select_related("base_model").get_or_404(pk)
    template = "jobs/_dataset_status.html" if request.htmx else "jobs/dataset_detail.html"
    return render(request, template, {"dataset": dataset, "histogram": _histogram_bars(dataset.token_stats)})


@login_required
@require_POST
def dataset_drop_invalid(request, pk):
    dataset = Dataset.objects.owned_by(request.user).get_or_404(pk)
    try:
        new = services.reprocess_dataset_dropping_invalid(request.user, dataset)
    except InputError as exc:
        messages.error(request, str(exc))
        return redirect("dataset-detail", pk=dataset.pk)
    return redirect("dataset-detail", pk=new.pk)


@login_required
@require_POST
def dataset_retry(request, pk):
    dataset = Dataset.objects.owned_by(request.user).get_or_404(pk)
    try:
        services.retry_dataset(dataset)
    except InputError as exc:
        messages.error(request, str(exc))
    return redirect("dataset-detail", pk=dataset.pk)


@login_required
@require_POST
def dataset_delete(request, pk):
    dataset = Dataset.objects.owned_by(request.user).get_or_404(pk)
    try:
        services.delete_dataset(dataset)
    except InputError as exc:
        messages.error(request, str(exc))
        return redirect("dataset-detail", pk=dataset.pk)
    messages.info(request, f"Dataset {dataset.name!r} deleted.")
    return redirect("datasets")


def _histogram_bars(stats):
    hist = (stats or {}).get("histogram") or {}
    counts, edges = hist.get("counts") or [], hist.get("edges") or []
    if not counts:
        return []
    top = max(counts) or 1
    return [
        {"count": c, "height": round(100 * c / top, 1), "low": edges[i] if i < len(edges) else "",
         "high": edges[i + 1] if i + 1 < len(edges) else ""}
        for i, c in enumerate(counts)
    ]


# ---------------------------------------------------------------- jobs

FORM_OVERRIDES = ("rank", "alpha", "micro_batch", "grad_accum", "max_seq_len", "learning_rate", "epochs", "max_steps",
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
    if request.method == "POST":
        try:
            base_model, dataset = _form_objects(request, values)
            job = services.create_job(request.user, base_model, dataset, values["method"], _all_overrides(values),
                                      values["adapter_name"])
            return redirect("job-detail", pk=job.pk)
        except InputError as exc:
            error = str(exc)
    context = {
        "values": values,
        "cloned": cloned,
        "datasets": Dataset.objects.owned_by(request.user).filter(status=Dataset.Status.READY),
        "base_models": BaseModel.visible_to(request.user),
        "methods": ["auto", *METHODS],
        "error": error,
    }
    return render(request, "jobs/job_new.html", context, status=400 if error else 200)


@login_required
def plan_preview(request):
    """The plan for the form as it stands; htmx swaps it in on every change."""
    values = _job_form_values(request)
    try:
        base_model, dataset = _form_objects(request, values)
        plan = services.make_plan(base_model, dataset, values["method"], _all_overrides(values))
        return render(request, "jobs/_plan.html", {"plan": plan, "memory": _memory_bars(plan)})
    except (InputError, Http404) as exc:
        return render(request, "jobs/_plan.html", {"plan_error": str(exc) or "Not found."})


def _memory_bars(plan):
    memory = plan.get("memory") or {}
    capacity = memory.get("capacity_bytes") or 0
    total = memory.get("total_bytes") or 0
    scale = max(capacity, total) or 1
    bars = [
        {"name": name.replace("_", " "), "bytes": value, "width": round(100 * value / scale, 2)}
        for name, value in (memory.get("breakdown") or {}).items()
        if isinstance(value, (int, float)) and value > 0
    ]
    return {"bars": bars, "capacity": capacity, "total": total, "used_pct": round(100 * total / scale, 1)}


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
    queue_position = None
    if job.status == JobStatus.QUEUED:
        queue_position = FineTuneJob.objects.filter(status=JobStatus.QUEUED).filter(
            Q(created_at__lt=job.created_at) | Q(created_at=job.created_at, pk__lt=job.pk)
        ).count() + 1
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
        "events": list(job.events.order_by("-created_at", "-id")[:30]),
        "version": AdapterVersion.objects.filter(job=job).select_related("line").first(),
        "elapsed": format_duration(elapsed),
        "remaining": format_duration(remaining),
        "progress_pct": round(100 * (job.progress or 0), 1),
        "queue_position": queue_position,
        "memory": {
            "used": used,
            "estimate": estimate,
            "capacity": capacity,
            "used_pct": round(100 * (used or 0) / scale, 1),
            "estimate_pct": round(100 * (estimate or 0) / scale, 1),
            "ratio": round(used / estimate, 2) if used and estimate else None,
        },
        "fit_check": _fit_check_view(metrics.get("fit_check")),
        "log_lines": log_lines,
        "log_source": log_source,
        "poll_ms": 1000 if job.status == JobStatus.RUNNING else 2000,
    }


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
    rows = []
    for key, value in sorted((metrics or {}).items()):
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
            "sets": [{"id": k, "name": e.get("name"), "status": e.get("status")}
                     for k, e in ev["sets"].items() if e.get("kind") != "prompt"]}


@login_required
def version_detail(request, pk):
    version = (AdapterVersion.objects.owned_by(request.user)
               .select_related("owner", "line", "base_model", "dataset", "job").get_or_404(pk))
    shown_evaluation = _evaluation_view(version, request.GET.get("set"))
    if request.htmx and request.GET.get("part") == "evaluation":
        return render(request, "jobs/_version_evaluation.html", {"version": version, "evaluation": shown_evaluation})
    lineage = version.lineage or {}
    siblings = list(version.line.versions.order_by("-version").values("pk", "version"))
    context = {
        "version": version,
        "is_champion": version.line.champion_id == version.pk,
        "lineage": lineage,
        "libraries": sorted((lineage.get("libraries") or {}).items()),
        "metric_rows": _scalar_metrics(version.metrics),
        "evaluation": shown_evaluation,
        "deployments": list(version.deployments.filter(ACTIVE_DEPLOYMENT)),
        "siblings": siblings,
        "compare_ids": ",".join(str(s["pk"]) for s in siblings[:4]) if len(siblings) > 1 else "",
        "plan_json": json.dumps(version.plan, indent=2, sort_keys=True),
        "curves": [_curve_for_chart(version)],
    }
    return render(request, "jobs/version_detail.html", context)


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
                delete_version(version)
            except VersionInUse as exc:
                messages.error(request, str(exc))
            else:
                messages.success(request, f"Deleted {version.label}.")
                return redirect("versions")
        blocking = list(version.deployments.filter(ACTIVE_DEPLOYMENT))
    return render(request, "jobs/version_delete.html", {"version": version, "blocking": blocking},
                  status=409 if (request.method == "POST" and blocking) else 200)


def _versions_from_ids(request, raw_ids, *, at_least=1):
    ids = parse_version_ids(raw_ids, at_least=at_least, action="compare")
    return owned_versions(request.user, ids, "line", "base_model", "dataset")


@login_required
@require_POST
def version_evaluate(request, pk):
    version = AdapterVersion.objects.owned_by(request.user).select_related("line", "dataset").get_or_404(pk)
    try:
        new_tokens = evaluation.clean_new_tokens(request.POST.get("max_new_tokens"))
        typed = evaluation.prompt_lines(request.POST.get("prompts", ""))
        prompts, name, kind = evaluation.choose_prompts(version, typed)
        set_id = evaluation.queue_evaluation([version], prompts, name=name, kind=kind, max_new_tokens=new_tokens,
                                             force=request.POST.get("force") == "1")
    except InputError as exc:
        messages.error(request, str(exc))
        return redirect("version-detail", pk=pk)
    return redirect(reverse("version-detail", args=[pk]) + f"?set={set_id}#evaluation")


@login_required
def compare_page(request):
    try:
        versions = _versions_from_ids(request, request.GET.getlist("ids"), at_least=2)
    except InputError as exc:
        return render(request, "jobs/compare.html", {"error": str(exc)}, status=400)
    versions.sort(key=lambda v: (v.line.name, v.version))  # v1 left of v2, whatever order they were ticked in
    if not request.GET.get("set"):
        _start_validation_evaluation(versions)
    polling_evaluation = bool(request.htmx and request.GET.get("part") == "evaluation")
    data = compare_versions(versions, request.GET.get("set") or None, curves=not polling_evaluation)
    ids = ",".join(str(v.pk) for v in versions)
    if polling_evaluation:
        return render(request, "jobs/_compare_evaluation.html", {"data": data, "ids": ids, "versions": versions})
    curves = [_curve_json(v["label"], v["curve"]) for v in data["versions"]]
    return render(request, "jobs/compare.html", {
        "data": data, "versions": versions, "ids": ids, "curves": curves,
        "columns": len(versions) + 1,
    })


def _start_validation_evaluation(versions):
    """Opening a comparison queues the versions (and the base model) on the validation prompts of the first
    version's dataset, unless every one has that set already: the set's id is a hash of its prompts, so this is
    a lookup after the first time, and the generations side by side fill in while the page polls."""
    try:
        prompts, name, kind = evaluation.choose_prompts(versions[0])
        wanted = evaluation.set_id_for(prompts, evaluation.DEFAULT_NEW_TOKENS)
        if all(evaluation.entry_of(v, wanted) for v in versions):
            return
        evaluation.queue_evaluation(versions, prompts, name=name, kind=kind)
    except InputError:
        return  # no validation prompts: the page offers the prompt-set form instead
    for v in versions:
        v.refresh_from_db(fields=["metrics"])


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
    return render(request, "jobs/_compare_prompt.html", {
        "run": run, "versions": versions, "ids": ",".join(str(v.pk) for v in versions),
        "columns": list(zip(versions, run["outputs"], run["errors"], run["statuses"])),
    })


# ---------------------------------------------------------------- workers and tokens


@login_required
def worker_list(request):
    now = timezone.now()
    workers = list(Worker.objects.select_related("current_job"))
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
    template = "jobs/_workers_table.html" if request.htmx else "jobs/workers.html"
    return render(request, template, {"workers": workers, "heartbeat_seconds": _heartbeat_seconds()})


def _heartbeat_seconds():
    from django.conf import settings

    return settings.WORKER_HEARTBEAT_SECONDS


@login_required
def token_list(request):
    new_token = None
    if request.method == "POST":
        if request.POST.get("revoke"):
            token = ApiToken.objects.owned_by(request.user).get_or_404(request.POST["revoke"])
            token.revoked_at = timezone.now()
            token.save(update_fields=["revoked_at"])
        else:
            name = (request.POST.get("name") or "token").strip()[:100] or "token"
            _, new_token = ApiToken.issue(request.user, name=name)
    tokens = ApiToken.objects.filter(user=request.user).order_by("-created_at")
    return render(request, "jobs/tokens.html", {"tokens": tokens, "new_token": new_token})


def healthz(request):
    return HttpResponse("ok", content_type="text/plain")


def reverse_job(job):
    return reverse("job-detail", args=[job.pk])
