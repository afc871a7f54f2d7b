"""The Models page: the base models a user can fine-tune (with where each fits and the adapters built on it), a form
that pulls one from the Hugging Face Hub (looked at first: size, licence, architecture, disk), its progress and
cancel, the Hub token, and for administrators a form that registers a model folder on the server
(jobs/base_models.py, jobs/hub_pulls.py and jobs/hub_tokens.py decide what may be done)."""
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from . import hub_pulls, hub_tokens, services
from .model_fit import training_workers, worker_fits
from .models import BaseModel


@login_required
def model_list(request):
    form = {"name": "", "path": "", "shared": True}
    pull_form = {"repo_id": "", "revision": ""}
    error = pull_error = look = None
    action = request.POST.get("action", "register") if request.method == "POST" else None
    if action == "register":
        if not services.may_register_folders(request.user):
            raise PermissionDenied(services.ADMINS_ONLY)  # before the form is read: the answer names no path
        form = {"name": request.POST.get("name", ""), "path": request.POST.get("path", ""),
                "shared": request.POST.get("shared") == "on"}
        owner = None if form["shared"] else request.user
        try:
            model = services.register_base_model(request.user, form["name"], form["path"], owner=owner)
        except services.InputError as exc:
            error = exc
        else:
            messages.success(request, f"Registered {model.name} ({model.architecture}).")
            return redirect("models")
    elif action in ("look", "pull"):
        pull_form = {"repo_id": request.POST.get("repo_id", ""), "revision": request.POST.get("revision", "")}
        try:
            if action == "look":
                look = hub_pulls.preview_pull(request.user, pull_form["repo_id"], pull_form["revision"])
            else:
                model, started = hub_pulls.start_pull(request.user, pull_form["repo_id"], pull_form["revision"])
                messages.success(request, f"Pulling {model.name}." if started else f"{model.name} is already here.")
                return redirect("models")
        except services.InputError as exc:
            pull_error = exc
    elif action in ("token", "site-token"):
        try:
            hub_tokens.set_token(request.user, request.POST.get("token", ""), site=action == "site-token")
        except services.InputError as exc:
            pull_error = exc
        else:
            messages.success(request, "Hub token saved." if request.POST.get("token") else "Hub token removed.")
            return redirect("models")
    return render(request, "jobs/models.html", {
        **_list_context(request.user),
        "can_register": services.may_register_folders(request.user),
        "model_roots": services.configured_model_roots(),
        "form": form, "error": error, "pull_form": pull_form, "pull_error": pull_error, "look": look,
        "tokens": hub_tokens.token_status(request.user),
    }, status=400 if error or pull_error else 200)


@login_required
def model_progress(request, pk):
    """One row's pull progress (polled by htmx while the pull is under way)."""
    model = BaseModel.visible_to(request.user).get_or_404(pk)
    return render(request, "jobs/_model_pull.html", {"m": model, "progress": hub_pulls.progress_of(model)})


@login_required
@require_POST
def model_cancel(request, pk):
    model = BaseModel.visible_to(request.user).get_or_404(pk)
    try:
        hub_pulls.cancel_pull(request.user, model)
    except services.InputError as exc:
        messages.error(request, str(exc))
    return redirect("models")


def _list_context(user) -> dict:
    models = BaseModel.visible_to(user).select_related("owner").annotate(
        adapters=Count("adapterversion", filter=Q(adapterversion__owner=user)))
    workers = training_workers()
    return {"models": [_row(m, workers) for m in models], "workers": workers}


def _row(model: BaseModel, workers) -> dict:
    config = model.config or {}
    return {
        "model": model,
        "context": config.get("max_position_embeddings") or config.get("n_positions"),
        "dtype": model.dtype or config.get("torch_dtype") or config.get("dtype") or "",
        "fits": worker_fits(model, workers),
        "progress": hub_pulls.progress_of(model),
    }
