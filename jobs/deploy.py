"""Deployments: a version becomes a live model behind the OpenAI-compatible API. Plain functions.

The lifecycle (the Deployment row is the source of truth, as for jobs):

    deploy / rollback ──> merging ──(Celery task on the gpu queue: merge + logit check)──> loading
                     └──> loading (unmerged: asked for, or the method cannot be merged)
    loading ──(the inference server loads it)──> live          any step ──> failed (with the reason)
    stop ──> stopped

A deployment is a stable name (the OpenAI `model`), by default its adapter line's name; deploying another
version of the same line, or rolling back, repoints that name to the other version. Every change bumps
`revision`, and work started for an older revision (a merge, a load) never writes over a newer state.

Nothing here imports torch. The merge, on the worker side, is jobs.deploy_worker.run_deploy.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from tunedeck.secretfile import read_or_create_secret

from . import queue
from .models import AdapterVersion, Deployment
from .services import InputError

log = logging.getLogger(__name__)

Status = Deployment.Status
ACTIVE = (Status.MERGING, Status.LOADING, Status.LIVE)
SERVED = (Status.LOADING, Status.LIVE)  # what the inference server holds
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
HISTORY_LIMIT = 20
LOADING_PATIENCE_SECONDS = 120


# ---------------------------------------------------------------- requests from the pages and the API


def deploy_version(user, version: AdapterVersion, *, merge: bool = True, name: str = "") -> Deployment:
    """Starts deploying `version` and returns its deployment (202-style: the work goes on in the background).

    With no name, the user's existing deployment of the same adapter line is repointed to this version (so
    its clients keep their model name); else a new deployment named after the line is made.
    """
    if version.owner_id != user.pk:
        raise InputError("No such adapter version.", code="not_found")
    if not Path(version.path).is_dir():
        raise InputError("The adapter files of this version are missing on the server.", code="gone")
    name = (name or "").strip()
    if name and not NAME_RE.match(name):
        raise InputError(
            "A deployment name is 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit.",
            field="name",
        )
    with transaction.atomic():
        if name:
            existing = Deployment.objects.select_for_update().filter(name=name).first()
            if existing is not None and existing.owner_id != user.pk:
                raise InputError(f"The name {name!r} is taken; choose another.", field="name", code="name_taken")
        else:
            existing = (
                Deployment.objects.select_for_update(of=("self",))  # the version side may be null (deleted)
                .filter(owner=user)
                .filter(Q(version__line_id=version.line_id) | Q(version__isnull=True,
                                                                 details__deleted_version__line_id=version.line_id))
                .order_by("-updated_at", "-pk")
                .first()
            )
        if existing is not None:
            return _repoint(existing, version, merge, reason="deployed")
    return _create(user, version, merge, name)


def _create(user, version: AdapterVersion, merge: bool, name: str) -> Deployment:
    candidates = [name] if name else _default_names(user, version)
    for candidate in candidates:
        try:
            with transaction.atomic():
                deployment = Deployment.objects.create(
                    owner=user,
                    version=version,
                    name=candidate,
                    merge=merge,
                    status=_first_status(version, merge),
                    details=_fresh_details(version, merge, [], "deployed"),
                    revision=1,
                )
                _enqueue_on_commit(deployment)
                return deployment
        except IntegrityError:
            if name:
                raise InputError(f"The name {name!r} is taken; choose another.", field="name", code="name_taken")
    raise InputError("Could not find a free deployment name; give one.", field="name")


def _default_names(user, version: AdapterVersion):
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", version.line.name).strip("-.")[:80] or "model"
    if not base[0].isalnum():
        base = "m" + base
    yield base
    yield f"{base}-{re.sub(r'[^A-Za-z0-9]+', '', user.get_username())[:16] or user.pk}"
    for i in range(2, 50):
        yield f"{base}-{i}"


def _repoint(deployment: Deployment, version: AdapterVersion, merge: bool, reason: str) -> Deployment:
    history = list(deployment.details.get("history") or [])
    if deployment.status != Status.STOPPED or deployment.version_id != version.pk:
        history.append({
            "version": deployment.version_id or (deployment.version_deleted or {}).get("id"),
            "label": deployment.details.get("version_label") or deployment.version_label,
            "status": deployment.status,
            "until": timezone.now().isoformat(),
            **({"deleted": True} if deployment.version_deleted else {}),
        })
    deployment.version = version
    deployment.merge = merge
    deployment.status = _first_status(version, merge)
    deployment.error = ""
    deployment.path = ""
    deployment.details = _fresh_details(version, merge, history[-HISTORY_LIMIT:], reason)
    deployment.revision = F("revision") + 1
    deployment.updated_at = timezone.now()
    deployment.save()
    deployment.refresh_from_db()
    _enqueue_on_commit(deployment)
    return deployment


def _first_status(version: AdapterVersion, merge: bool) -> str:
    from finetune.merge import can_merge

    return Status.MERGING if merge and can_merge(version.method) else Status.LOADING


def _fresh_details(version: AdapterVersion, merge: bool, history: list, reason: str) -> dict:
    from finetune.merge import UNMERGEABLE_REASONS, can_merge

    details = {
        "version_label": version.label,
        "adapter_name": version.line.name,
        "version_number": version.version,
        "method": version.method,
        "base_model": version.base_model.name,
        "merge_requested": merge,
        "history": history,
        "action": reason,
    }
    if not merge:
        details["serving"] = "unmerged: base model + adapter, as asked"
    elif not can_merge(version.method):
        why = UNMERGEABLE_REASONS.get(version.method, f"{version.method} adapters cannot be merged")
        details["unmerged_reason"] = why
        details["serving"] = f"unmerged: base model + adapter, because {why}"
    return details


def _enqueue_on_commit(deployment: Deployment) -> None:
    pk, revision = deployment.pk, deployment.revision
    transaction.on_commit(lambda: queue.send_deploy(pk, revision))


def deleted_version_reason(deployment: Deployment) -> str:
    """Why a deployment whose version was deleted cannot be deployed again or rolled back, and what to do."""
    deleted = deployment.version_deleted or {}
    return (f"{deleted.get('label') or 'The version it served'} was deleted, with its files, so {deployment.name} "
            "cannot be deployed again or rolled back; deploy another version under this name from its page.")


def stop(deployment: Deployment) -> Deployment:
    """Undeploys: the inference server drops the model within a second. Merged files stay for export."""
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().get(pk=deployment.pk)
        if deployment.status != Status.STOPPED:
            deployment.status = Status.STOPPED
            deployment.revision = F("revision") + 1
            deployment.updated_at = timezone.now()
            deployment.details = {**deployment.details, "stopped_at": timezone.now().isoformat()}
            deployment.save()
            deployment.refresh_from_db()
    return deployment


def previous_version(deployment: Deployment) -> AdapterVersion | None:
    """The version just before the deployed one in the same adapter line (None once that version is deleted)."""
    current = deployment.version
    if current is None:
        return None
    return (
        AdapterVersion.objects.filter(line_id=current.line_id, version__lt=current.version)
        .select_related("line", "base_model")
        .order_by("-version")
        .first()
    )


def rollback(deployment: Deployment) -> Deployment:
    """Repoints the deployment to the previous version of its adapter line, keeping its name and merge choice."""
    with transaction.atomic():
        deployment = (Deployment.objects.select_for_update(of=("self",)).select_related("version__line")
                      .get(pk=deployment.pk))
        if deployment.version is None:
            raise InputError(deleted_version_reason(deployment), code="version_deleted")
        target = previous_version(deployment)
        if target is None:
            raise InputError(
                f"{deployment.version.label} is the first version of {deployment.version.line.name}; there is "
                "no earlier version to roll back to.",
                code="no_previous_version",
            )
        if not Path(target.path).is_dir():
            raise InputError(f"The adapter files of {target.label} are missing on the server.", code="gone")
        rolled_from = deployment.version.label
        deployment = _repoint(deployment, target, deployment.merge, reason="rolled back")
        deployment.details = {**deployment.details, "rolled_back_from": rolled_from}
        deployment.save(update_fields=["details"])
    return deployment


# ---------------------------------------------------------------- shared with the worker side (jobs.deploy_worker)


def merged_dir_for(version: AdapterVersion) -> Path:
    """Merged models are kept per version, so a rollback to a version merged before needs no new merge."""
    return settings.DEPLOYMENT_DIR / f"user-{version.owner_id}" / f"version-{version.pk}-merged"


def update_if_current(deployment_id: int, revision: int, **fields) -> bool:
    """Writes only if the deployment is still at `revision`; False when a newer request replaced this work."""
    fields["updated_at"] = timezone.now()
    return bool(Deployment.objects.filter(pk=deployment_id, revision=revision).update(**fields))


def mark_failed(deployment_id: int, revision: int, reason: str) -> bool:
    return update_if_current(deployment_id, revision, status=Status.FAILED, error=reason[:4000])


def mark_live(deployment_id: int, revision: int) -> bool:
    fields = {"status": Status.LIVE, "updated_at": timezone.now()}
    return bool(
        Deployment.objects.filter(pk=deployment_id, revision=revision, status=Status.LOADING).update(**fields)
    )


# ---------------------------------------------------------------- the inference server side


def serving_specs() -> list[dict]:
    """What the inference server should hold: every deployment that is loading or live."""
    specs = []
    queryset = Deployment.objects.filter(status__in=SERVED, version__isnull=False).select_related(
        "version__base_model")
    for d in queryset:
        merged = bool(d.path)
        spec = {
            "id": d.pk,
            "name": d.name,
            "revision": d.revision,
            "status": d.status,
            "kind": "merged" if merged else "adapter",
            "model_dir": d.path if merged else None,
            "adapter_dir": None if merged else d.version.path,
            "base_path": d.version.base_model.path,
        }
        spec["key"] = (d.pk, d.revision, spec["kind"], d.path or d.version.path)
        specs.append(spec)
    return specs


def loading_stalled(deployment: Deployment) -> bool:
    """Loading for longer than any small model takes: most likely no inference server is running."""
    waited = (timezone.now() - deployment.updated_at).total_seconds()
    return deployment.status == Status.LOADING and waited > LOADING_PATIENCE_SECONDS


INTERNAL_TOKEN_FILE = "inference-token"  # in the data directory


def internal_token() -> str:
    """The secret the web process shows the inference server (header X-Tunedeck-Internal): TUNEDECK_INTERNAL_TOKEN,
    or a random one made once in the data directory (mode 0600) that the web server, the workers and the inference
    server share. Never derived from SECRET_KEY, so knowing one gives nothing of the other."""
    return os.environ.get("TUNEDECK_INTERNAL_TOKEN", "").strip() or read_or_create_secret(
        Path(settings.DATA_DIR) / INTERNAL_TOKEN_FILE)


# ---------------------------------------------------------------- export


def export_commands(deployment: Deployment) -> dict | None:
    """Ready-to-run vLLM and TGI command lines for the merged model and for the adapter on its base. They listen
    on $SERVE_PORT, which the user sets to a free port (unset: vLLM 8001, TGI 8080; 8000 is Tunedeck's own default
    port). None once its version is deleted."""
    version = deployment.version
    if version is None:
        return None
    name = deployment.name
    archive = f"{name}-merged.zip"
    base_path = version.base_model.path
    adapter_path = version.path
    rank = int((version.plan or {}).get("rank") or 16)
    max_lora_rank = next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), 512)
    from finetune.methods import find_method

    method = find_method(version.method)  # the method says whether vLLM and TGI load it as a LoRA adapter
    lora_like = bool(method and method.serves_as_lora) and deployment.details.get("peft_type", "LORA") in (
        "LORA",
        "",
    )
    merged = {
        "unpack": f"unzip {archive} -d {name}",
        "vllm": f"vllm serve ./{name} --served-model-name {name} --port ${{SERVE_PORT:-8001}}",
        "tgi": (
            f"docker run --gpus all --shm-size 1g -p ${{SERVE_PORT:-8080}}:80 -v $PWD/{name}:/data/{name} "
            f"ghcr.io/huggingface/text-generation-inference:latest --model-id /data/{name}"
        ),
    }
    adapter = {
        "supported": lora_like,
        "note": "" if lora_like else (
            f"vLLM and TGI serve LoRA adapters only; a {version.method} adapter is served by Tunedeck's own "
            "inference server (or merge it, where the method allows)."
        ),
        "vllm": (
            f"vllm serve {base_path} --enable-lora --max-lora-rank {max_lora_rank} "
            f"--lora-modules {name}={adapter_path} --port ${{SERVE_PORT:-8001}}"
        ),
        "tgi": (
            f"docker run --gpus all --shm-size 1g -p ${{SERVE_PORT:-8080}}:80 -v {base_path}:/data/base "
            f"-v {adapter_path}:/data/{name} -e LORA_ADAPTERS={name}=/data/{name} "
            "ghcr.io/huggingface/text-generation-inference:latest --model-id /data/base"
        ),
    }
    return {"merged": merged, "adapter": adapter, "archive": archive}


def export_problem(deployment: Deployment):
    """(code, message, http status) when the deployment has no merged model to download, else None."""
    if deployment.version_id is None:
        return "gone", deleted_version_reason(deployment), 410
    if not deployment.path:
        if deployment.status in (Deployment.Status.MERGING, Deployment.Status.LOADING) and deployment.merge:
            return "not_ready", "The merge has not finished yet; try again when the deployment is live.", 409
        return (
            "not_merged",
            "This deployment serves the adapter unmerged, so there is no merged model to export; download the "
            f"adapter instead (/api/v1/adapter-versions/{deployment.version_id}/download).",
            409,
        )
    if not Path(deployment.path).is_dir():
        return "gone", "The merged model files are missing on the server.", 410
    return None
