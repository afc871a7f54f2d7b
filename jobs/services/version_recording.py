"""Worker side: a trained adapter moved into the store and recorded as the next version of its line, with its
lineage. Runs on the worker that trained it (jobs/runner.py); the web process never imports this module."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from ..models import AdapterLine, AdapterVersion, FineTuneJob


def record_adapter_version(job: FineTuneJob, adapter_dir: Path, result_metrics: dict, generations, plan) -> AdapterVersion:
    """Moves the trained adapter into the store and records it as the next version of its line."""
    with transaction.atomic():
        line, _ = AdapterLine.objects.get_or_create(owner=job.owner, name=job.adapter_name)
        line = AdapterLine.objects.select_for_update().get(pk=line.pk)
        number = (line.versions.order_by("-version").values_list("version", flat=True).first() or 0) + 1
        dest = settings.ADAPTER_DIR / f"user-{job.owner_id}" / f"line-{line.pk}" / f"v{number}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(adapter_dir), dest)
        version = AdapterVersion.objects.create(
            owner=job.owner,
            line=line,
            version=number,
            job=job,
            base_model=job.base_model,
            dataset=job.dataset,
            method=plan.get("method", job.method),
            path=str(dest),
            plan=plan,
            metrics=result_metrics,
            generations=generations or [],
            lineage=_lineage(job, dest, plan),
        )
    return version


LINEAGE_CURVE_POINTS = 300


def _lineage(job: FineTuneJob, adapter_dir: Path, plan: dict) -> dict:
    from finetune.evaluate import library_versions

    from ..metrics import as_series, downsampled_points

    meta = {}
    meta_path = adapter_dir / "tunedeck.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
    return {
        "base_model": {"id": job.base_model_id, "name": job.base_model.name, "sha256": job.base_model.sha256},
        "dataset": {
            "id": job.dataset_id,
            "name": job.dataset.name,
            "content_hash": job.dataset.content_hash,
            "options_hash": job.dataset.options_hash,
            "schema": job.dataset.schema,
            "train_rows": job.dataset.train_rows,
            "validation_rows": job.dataset.validation_rows,
        },
        "plan": plan,
        # Runs on the worker that trained: these are the versions that made the adapter (metadata only, no import).
        "libraries": meta.get("libraries") or library_versions(),
        "created_by": job.owner.get_username(),
        "created_at": timezone.now().isoformat(),
        "job": job.pk,
        # A copy of the curves, so the version keeps them whatever happens to the job's metric rows.
        "curves": as_series(downsampled_points(job, LINEAGE_CURVE_POINTS)),
    }
