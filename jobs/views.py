"""Pages. Each looks objects up through the user's own querysets, so another user's ids give 404."""
import json
from pathlib import Path

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from . import services
from .metrics import downsampled_points
from .models import METHODS, AdapterLine, AdapterVersion, ApiToken, BaseModel, Dataset, FineTuneJob, JobStatus, Worker
from .services import SCHEMAS, InputError


def _owned(model, user, pk, **related):
    queryset = model.objects.owned_by(user)
    if related.get("select"):
        queryset = queryset.select_related(*related["select"])
    return get_object_or_404(queryset, pk=pk)


@login_required
def dashboard(request):
    user = request.user
    context = {
        "jobs": FineTuneJob.objects.owned_by(user).select_related("dataset", "base_model")[:8],
        "datasets": Dataset.objects.owned_by(user)[:5],
        "versions": AdapterVersion.objects.owned_by(user).select_related("line")[:5],
        "workers": Worker.objects.all()[:10],
        "running": FineTuneJob.objects.owned_by(user).filter(status=JobStatus.RUNNING).count(),
        "queued": FineTuneJob.objects.owned_by(user).filter(status=JobStatus.QUEUED).count(),
    }
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
                    base_model = get_object_or_404(BaseModel.visible_to(request.user), pk=request.POST["base_model"])
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
    dataset = _owned(Dataset, request.user, pk, select=["base_model"])
    template = "jobs/_dataset_status.html" if request.htmx else "jobs/dataset_detail.html"
    return render(request, template, {"dataset": dataset, "histogram": _histogram_bars(dataset.token_stats)})


@login_required
@require_POST
def dataset_drop_invalid(request, pk):
    dataset = _owned(Dataset, request.user, pk)
    try:
        new = services.reprocess_dataset_dropping_invalid(request.user, dataset)
    except InputError as exc:
        messages.error(request, str(exc))
        return redirect("dataset-detail", pk=dataset.pk)
    return redirect("dataset-detail", pk=new.pk)


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


def _job_form_values(request):
    source = request.POST if request.method == "POST" else request.GET
    overrides = {}
    for key in ("rank", "alpha", "micro_batch", "grad_accum", "max_seq_len", "learning_rate", "epochs", "max_steps",
                "gradient_checkpointing"):
        value = source.get(key, "").strip()
        if value:
            overrides[key] = value
    return {
        "base_model": source.get("base_model", ""),
        "dataset": source.get("dataset", ""),
        "method": source.get("method", "auto"),
        "adapter_name": source.get("adapter_name", ""),
        "overrides": overrides,
    }


def _form_objects(request, values):
    base_model = (
        get_object_or_404(BaseModel.visible_to(request.user), pk=values["base_model"])
        if values["base_model"] else services.default_base_model()
    )
    if base_model is None:
        raise InputError("No base model is registered yet.", field="base_model")
    if not values["dataset"]:
        raise InputError("Choose a dataset.", field="dataset")
    dataset = get_object_or_404(Dataset.objects.owned_by(request.user), pk=values["dataset"])
    return base_model, dataset


@login_required
def job_new(request):
    values = _job_form_values(request)
    clone_of = request.GET.get("clone")
    if clone_of and request.method == "GET":
        source = _owned(FineTuneJob, request.user, clone_of)
        values = {"base_model": str(source.base_model_id), "dataset": str(source.dataset_id),
                  "method": source.method, "adapter_name": source.adapter_name,
                  "overrides": {k: v for k, v in source.overrides.items()}}
    error, plan = None, None
    if request.method == "POST":
        try:
            base_model, dataset = _form_objects(request, values)
            job = services.create_job(request.user, base_model, dataset, values["method"], values["overrides"],
                                      values["adapter_name"])
            return redirect("job-detail", pk=job.pk)
        except InputError as exc:
            error = str(exc)
    context = {
        "values": values,
        "datasets": Dataset.objects.owned_by(request.user).filter(status=Dataset.Status.READY),
        "base_models": BaseModel.visible_to(request.user),
        "methods": ["auto", *METHODS],
        "error": error,
        "plan": plan,
    }
    return render(request, "jobs/job_new.html", context, status=400 if error else 200)


@login_required
def plan_preview(request):
    """The plan for the form as it stands; htmx swaps it in on every change."""
    values = _job_form_values(request)
    try:
        base_model, dataset = _form_objects(request, values)
        plan = services.make_plan(base_model, dataset, values["method"], values["overrides"])
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
    jobs = FineTuneJob.objects.owned_by(request.user).select_related("dataset", "base_model", "adapter_version")
    wanted = request.GET.get("status", "")
    if wanted:
        jobs = jobs.filter(status=wanted)
    return render(request, "jobs/jobs.html", {"jobs": jobs[:200], "status": wanted, "statuses": JobStatus.values})


@login_required
def job_detail(request, pk):
    job = _owned(FineTuneJob, request.user, pk, select=["dataset", "base_model"])
    context = {"job": job, "events": job.events.order_by("-created_at", "-id")[:20],
               "version": AdapterVersion.objects.filter(job=job).select_related("line").first()}
    if request.htmx:
        context["chart"] = _loss_chart(job)
        return render(request, "jobs/_job_live.html", context)
    context["chart"] = _loss_chart(job)
    return render(request, "jobs/job_detail.html", context)


def _loss_chart(job, width=600, height=160):
    points = [p for p in downsampled_points(job, 300) if p.get("train_loss") is not None]
    if len(points) < 2:
        return None
    losses = [p["train_loss"] for p in points]
    steps = [p["step"] for p in points]
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0
    first, last = steps[0], steps[-1]
    xs = [(s - first) / ((last - first) or 1) * width for s in steps]
    ys = [height - (loss - low) / span * (height - 10) - 5 for loss in losses]
    return {
        "width": width,
        "height": height,
        "polyline": " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys)),
        "low": low,
        "high": high,
        "first": first,
        "last": last,
    }


@login_required
@require_POST
def job_cancel(request, pk):
    job = _owned(FineTuneJob, request.user, pk)
    services.request_cancel(job)
    if request.htmx:
        return job_detail(request, pk)
    return redirect("job-detail", pk=pk)


@login_required
@require_POST
def job_retry(request, pk):
    job = _owned(FineTuneJob, request.user, pk)
    try:
        services.retry_job(job)
    except InputError as exc:
        messages.error(request, str(exc))
    return redirect("job-detail", pk=pk)


# ---------------------------------------------------------------- adapter versions


@login_required
def version_list(request):
    lines = AdapterLine.objects.owned_by(request.user).prefetch_related("versions")
    versions = AdapterVersion.objects.owned_by(request.user).select_related("line", "base_model", "dataset")
    return render(request, "jobs/versions.html", {"lines": lines, "versions": versions})


@login_required
def version_detail(request, pk):
    version = _owned(AdapterVersion, request.user, pk, select=["line", "base_model", "dataset", "job"])
    return render(request, "jobs/version_detail.html", {
        "version": version,
        "plan_json": json.dumps(version.plan, indent=2, sort_keys=True),
        "lineage_json": json.dumps(version.lineage, indent=2, sort_keys=True),
    })


@login_required
def version_download(request, pk):
    from .api.views import zip_folder

    version = _owned(AdapterVersion, request.user, pk, select=["line"])
    folder = Path(version.path)
    if not folder.is_dir():
        raise Http404("The adapter files are missing on the server.")
    filename = f"{version.line.name}-v{version.version}.zip".replace("/", "_").replace('"', "")
    return FileResponse(zip_folder(folder), as_attachment=True, filename=filename, content_type="application/zip")


# ---------------------------------------------------------------- workers and tokens


@login_required
def worker_list(request):
    return render(request, "jobs/workers.html", {"workers": Worker.objects.select_related("current_job")})


@login_required
def token_list(request):
    new_token = None
    if request.method == "POST":
        if request.POST.get("revoke"):
            token = get_object_or_404(ApiToken, pk=request.POST["revoke"], user=request.user)
            from django.utils import timezone

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
