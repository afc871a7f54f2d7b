"""The Models page: the base models a user can fine-tune, and for administrators a form that registers a model
folder on the server (jobs/base_models.py decides what may be registered)."""
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect, render

from . import services
from .models import BaseModel


@login_required
def model_list(request):
    form = {"name": "", "path": "", "shared": True}
    error = None
    if request.method == "POST":
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
    models = BaseModel.visible_to(request.user).select_related("owner")
    return render(request, "jobs/models.html", {
        "models": [_row(m) for m in models],
        "can_register": services.may_register_folders(request.user),
        "model_roots": services.configured_model_roots(),
        "form": form,
        "error": error,
    }, status=400 if error else 200)


def _row(model: BaseModel) -> dict:
    config = model.config or {}
    return {
        "model": model,
        "context": config.get("max_position_embeddings") or config.get("n_positions"),
        "dtype": config.get("torch_dtype") or config.get("dtype") or "",
    }
