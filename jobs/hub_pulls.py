"""Pulling a base model from the Hugging Face Hub, web side: what a pull would fetch (shown before the user
confirms), starting one, cancelling one, and which training workers the model fits on. The download itself runs on
a worker (jobs/services/hub_download.py, through jobs.tasks.pull_base_model_task).

Sharing: a public repository at one commit is stored once, in one shared row (owner None) and one folder under
MODEL_DIR/hub/, whoever pulls it; a gated or private one pulled with a user's own token belongs to that user (the
Hub granted them, not everyone, access), and a second such user gets a row of their own pointing at the same
folder once their token has been checked against the Hub. Nothing a user uploaded or trained is ever shared here.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from django.conf import settings
from django.db import transaction

from finetune.errors import ModelFolderError

from . import queue
from .errors import InputError, NotAllowed
from .hub_tokens import token_for
from .models import BaseModel

PULL_TASK = "jobs.tasks.pull_base_model_task"
ACTIVE = ("pending", "downloading", "validating")
REMOTE_CODE_ADMINS_ONLY = ("Allowing a model's own Python code (trust_remote_code) is for administrators: that code "
                           "runs with the workers' permissions.")


def preview_pull(user, repo_id: str, revision: str = "", trust_remote_code: bool = False) -> dict:
    """What pulling repo_id@revision would fetch, read from the Hub: size, licence, architecture, and whether
    the data directory has room. Raises InputError in the user's terms."""
    from finetune.hub import describe_repo

    if trust_remote_code and not getattr(user, "is_staff", False):
        raise NotAllowed(REMOTE_CODE_ADMINS_ONLY)
    token, source = token_for(user)
    try:
        info = describe_repo(settings.HUB_ENDPOINT, repo_id, revision, token, trust_remote_code)
    except ModelFolderError as exc:
        raise InputError(str(exc), field="repo_id") from None
    info["token_source"] = source
    if not info["parameters"] and info["config"]:
        info["parameters"] = parameters_from_config(info["config"])
    info["owner"] = user if (info["gated"] or info["private"]) and source == "user" else None
    info["existing"] = _existing(info)
    info["needed_bytes"] = 0 if info["existing"] is not None else _bytes_to_fetch(info)
    info["free_bytes"] = shutil.disk_usage(_free_space_anchor()).free
    info["disk_ok"] = info["free_bytes"] - info["needed_bytes"] >= settings.HUB_DISK_RESERVE_BYTES
    return info


def parameters_from_config(config: dict) -> int:
    """The parameter count from config.json alone, for a repository whose Hub metadata does not state it (the
    estimator's count of the same shapes it plans with); 0 for an architecture it cannot read."""
    from autotune.shapes import ModelShape

    try:
        return int(ModelShape.from_config(config).parameters)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0


def start_pull(user, repo_id: str, revision: str = "", trust_remote_code: bool = False) -> tuple[BaseModel, bool]:
    """(the base model row, whether a download was started). The same repository and commit already pulled (or
    being pulled) for this user is returned as it is: stored once."""
    info = preview_pull(user, repo_id, revision, trust_remote_code)
    if info["existing"] is not None:
        return info["existing"], False
    if not info["disk_ok"]:
        raise InputError(disk_message(info), field="repo_id")
    with transaction.atomic():
        model = record_pull(user, info, trust_remote_code)
        transaction.on_commit(lambda: queue.send(PULL_TASK, model.pk))
    return model, True


def record_pull(user, info: dict, trust_remote_code: bool = False) -> BaseModel:
    """The pending row of a pull that preview_pull described (its message is the caller's to send)."""
    folder = hub_folder(info["repo_id"], info["commit"])
    ready_copy = BaseModel.objects.filter(path=str(folder), status="ready").first()
    with transaction.atomic():
        _owner_rows(info).filter(hub_repo=info["repo_id"], hub_commit=info["commit"],
                                 status__in=("failed", "cancelled")).delete()
        return BaseModel.objects.create(
            owner=info["owner"], name=_name(info), path=str(folder), hub_repo=info["repo_id"],
            hub_revision=info["revision"], hub_commit=info["commit"], hub_endpoint=settings.HUB_ENDPOINT,
            pulled_by=user, token_source=info["token_source"], license=info["license"], config=info["config"],
            architecture=info["architecture"], model_type=info["config"].get("model_type", ""),
            parameters=info["parameters"], trust_remote_code=trust_remote_code, files=info["files"],
            bytes_total=info["total_bytes"], status="pending",
            bytes_done=info["total_bytes"] if ready_copy else 0,
        )


def cancel_pull(user, model: BaseModel) -> BaseModel:
    """Stops a pull still under way; the worker notices within a moment and removes the partial files."""
    if not model.hub_repo or (model.owner_id is None and model.pulled_by_id != user.pk and not user.is_staff):
        raise NotAllowed("Only the user who started this pull, or an administrator, can cancel it.")
    if model.status not in ACTIVE:
        raise InputError(f"The pull of {model.name} is {model.status}; there is nothing to cancel.",
                         code="conflict")
    BaseModel.objects.filter(pk=model.pk, status__in=ACTIVE).update(
        status="cancelled", error="Cancelled by the user.")
    model.refresh_from_db()
    return model


def progress_of(model: BaseModel) -> dict:
    total = model.bytes_total or 0
    return {"status": model.status, "bytes_done": model.bytes_done, "bytes_total": total,
            "fraction": round(min(1.0, model.bytes_done / total), 4) if total else (1.0 if model.status == "ready"
                                                                                   else 0.0),
            "error": model.error}


def hub_folder(repo_id: str, commit: str) -> Path:
    return Path(settings.MODEL_DIR) / "hub" / repo_id.replace("/", "--") / commit


def disk_message(info: dict) -> str:
    from finetune.units import format_bytes as human_bytes

    return (f"Not enough free disk space for {info['repo_id']}: it needs {human_bytes(info['needed_bytes'])} and "
            f"the data directory has {human_bytes(info['free_bytes'])} free (keeping "
            f"{human_bytes(settings.HUB_DISK_RESERVE_BYTES)} in reserve). Free some space or pick a smaller model.")


def _existing(info: dict) -> BaseModel | None:
    return _owner_rows(info).filter(hub_repo=info["repo_id"], hub_commit=info["commit"]).exclude(
        status__in=("failed", "cancelled")).first()


def _owner_rows(info: dict):
    owner = info["owner"]
    return BaseModel.objects.filter(owner=owner) if owner is not None else BaseModel.objects.filter(
        owner__isnull=True)


def _bytes_to_fetch(info: dict) -> int:
    """The download, plus room for the converted folder of a GGUF file (float weights, about 4x a 4-bit file)."""
    folder = hub_folder(info["repo_id"], info["commit"])
    if BaseModel.objects.filter(path=str(folder), status="ready").exists():
        return 0
    return info["total_bytes"] * (5 if info["kind"] == "gguf" else 1)


def _free_space_anchor() -> Path:
    folder = Path(settings.MODEL_DIR)
    return folder if folder.exists() else Path(settings.DATA_DIR)


def _name(info: dict) -> str:
    return info["repo_id"] if info["revision"] == "main" else f"{info['repo_id']}@{info['revision']}"
