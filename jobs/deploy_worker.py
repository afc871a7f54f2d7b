"""The worker side of a deployment (Celery task jobs.tasks.deploy_version): merge, check, hand over to the
inference server. Workers only: the web process never imports this module (tests/test_architecture.py).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from finetune.errors import TunedeckError

from .deploy import Status, deleted_version_reason, mark_failed, merged_dir_for, update_if_current
from .models import AdapterVersion, Deployment

log = logging.getLogger("jobs.deploy")


def run_deploy(deployment_id: int, revision: int) -> str | None:
    """Merges (when asked and possible), checks, and hands the deployment to the inference server (loading)."""
    deployment = (
        Deployment.objects.select_related("version__base_model", "version__line").filter(pk=deployment_id).first()
    )
    if deployment is None or deployment.revision != revision or deployment.status not in (
        Status.MERGING,
        Status.LOADING,
    ):
        log.info("deployment %s revision %s is no longer wanted; skipped", deployment_id, revision)
        return None
    version = deployment.version
    if version is None:
        mark_failed(deployment.pk, revision, deleted_version_reason(deployment))
        return Status.FAILED
    details = dict(deployment.details)
    if deployment.status == Status.MERGING:
        # From here the page says "merging" instead of "queued (position N)"; the Workers page shows us busy.
        details.update(merge_started_at=timezone.now().isoformat(), merge_revision=revision,
                       merge_worker=_worker_name())
        if not update_if_current(deployment.pk, revision, details=details):
            return None
    try:
        from finetune.merge import AdapterNotMergeable, describe_adapter

        adapter_dir = Path(version.path)
        description = describe_adapter(adapter_dir)  # a clear error for a missing or broken adapter folder
        base_path = Path(version.base_model.path)
        if not base_path.is_dir():
            raise TunedeckError(f"The base model folder {base_path} is missing on the server.")
        details["peft_type"] = description["peft_type"]
        path = ""
        if deployment.merge:
            try:
                path, report = _merge(deployment, version, description)
                details.update(merged=True, merge=report, serving="merged model")
            except AdapterNotMergeable as exc:
                # Prefix and prompt tuning and adapter layers have no weights to fold into the base.
                details["merged"] = False
                details.setdefault("unmerged_reason", str(exc))
                details.setdefault("serving", f"unmerged: base model + adapter. {exc}")
        else:
            details.update(merged=False)
        if not _hand_to_inference_server(deployment.pk, revision, path, details):
            return None
        if path:  # downloads for llama.cpp and Ollama, written while the inference server loads the model
            from .gguf_exports import write_for_deployment

            write_for_deployment(deployment.pk, revision, path, deployment.name)
        return Status.LOADING
    except TunedeckError as exc:
        mark_failed(deployment.pk, revision, str(exc))
    except Exception as exc:
        log.exception("deployment %s crashed", deployment.pk)
        mark_failed(deployment.pk, revision, f"{type(exc).__name__}: {exc}")
    return Status.FAILED


def _worker_name() -> str:
    from celery import current_task

    return (getattr(current_task.request, "hostname", "") or "") if current_task else ""


def _merge(deployment: Deployment, version: AdapterVersion, description: dict) -> tuple[str, dict]:
    from finetune.merge import MERGE_MARKER, merge_adapter

    out_dir = merged_dir_for(version)
    marker = _read_json(out_dir / MERGE_MARKER)
    if marker and marker.get("adapter_dir") == str(Path(version.path)) and marker.get("merged"):
        return str(out_dir), {**_report(marker), "reused": True}
    report = merge_adapter(
        version.base_model.path,
        version.path,
        out_dir,
        method=description["method"] or version.method,
        device=getattr(settings, "TUNEDECK_MERGE_DEVICE", "auto"),
    )
    return str(out_dir), _report(report)


def _report(report: dict) -> dict:
    keys = ("max_abs_diff", "tolerance", "dtype", "method", "base_weights")
    return {k: report[k] for k in keys if k in report}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _hand_to_inference_server(deployment_id: int, revision: int, path: str, details: dict) -> bool:
    """Marks the deployment loading with what the merge found. The inference server may already have picked an
    unmerged deployment up (it serves what is loading) and written its engine notes, or made it live: those are
    kept, not overwritten by this task's older copy of the row."""
    with transaction.atomic():
        row = Deployment.objects.select_for_update().filter(pk=deployment_id, revision=revision).first()
        if row is None:
            return False
        already_live = row.status == Status.LIVE and not path and not row.path
        status = row.status if already_live else Status.LOADING
        return update_if_current(deployment_id, revision, status=status, path=path,
                                 details={**row.details, **details}, error="")
