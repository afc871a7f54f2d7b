"""Worker side of evaluations (jobs.tasks.evaluate_versions_task and evaluate_interactive): run_evaluation loads
the versions, calls finetune.evaluate and writes each result into the set entry jobs/evaluation.py queued, as it
comes. The web process never imports this module; building and queueing a prompt set is jobs/evaluation.py.
"""
from __future__ import annotations

import logging

from django.db import transaction

from ..evaluation import DEFAULT_NEW_TOKENS, entry_of, evaluation_of, now_iso

log = logging.getLogger(__name__)

def _update_entry(version_id: int, set_id: str, mutate):
    """Read-modify-write of one set entry under a row lock; other keys of metrics are preserved."""
    from ..models import AdapterVersion

    with transaction.atomic():
        version = AdapterVersion.objects.select_for_update().filter(pk=version_id).first()
        if version is None:
            return None
        metrics = dict(version.metrics or {})
        ev = evaluation_of(version)
        entry = ev["sets"].get(set_id)
        if entry is None:
            return None
        mutate(entry)
        version.metrics = {**metrics, "evaluation": ev}
        version.save(update_fields=["metrics"])
        return entry


def run_evaluation(version_ids: list[int], set_id: str) -> dict:
    """Evaluates the given versions on the set recorded on them, plus the base model once per base where no
    baseline is stored yet. Returns {version_id: status}."""
    from finetune.evaluate import evaluate_adapters, library_versions

    from ..models import AdapterVersion

    versions = [v for v in AdapterVersion.objects.select_related("base_model", "line").filter(pk__in=version_ids)
                if entry_of(v, set_id) is not None]
    environment = library_versions()
    started, worker = now_iso(), _worker_name()
    for v in versions:
        _update_entry(v.pk, set_id, lambda e: e.update(status="running", started_at=started, error="",
                                                      environment=environment, worker=worker))
    statuses = {}
    by_base: dict[int, list] = {}
    for v in sorted(versions, key=lambda v: v.pk):
        by_base.setdefault(v.base_model_id, []).append(v)
    for group in by_base.values():
        base = group[0].base_model
        first = entry_of(group[0], set_id)
        prompts, new_tokens = first["prompts"], int(first.get("max_new_tokens") or DEFAULT_NEW_TOKENS)
        stored_baseline = next((entry_of(v, set_id).get("baseline") for v in group
                                if entry_of(v, set_id).get("baseline")), None)
        targets = ([] if stored_baseline else [None]) + [v.path for v in group]
        owners = ([] if stored_baseline else [None]) + group
        base_info = {"id": base.pk, "name": base.name, "sha256": base.sha256}

        def write(index, outcome, owners=owners, group=group, base_info=base_info):
            owner = owners[index]
            finished = now_iso()
            if owner is None:
                baseline = {"base_model": base_info, **outcome}
                for v in group:
                    _update_entry(v.pk, set_id, lambda e: e.update(baseline=baseline))
                return
            if "error" in outcome:
                fields = {"status": "failed", "error": outcome["error"], "finished_at": finished,
                          "seconds": outcome.get("seconds")}
            else:
                fields = {"status": "done", "results": outcome["results"], "summary": outcome["summary"],
                          "finished_at": finished, "seconds": outcome.get("seconds"), "error": ""}
            _update_entry(owner.pk, set_id, lambda e: e.update(**fields))
            statuses[owner.pk] = fields["status"]

        if stored_baseline:
            for v in group:
                _update_entry(v.pk, set_id, lambda e, kept=stored_baseline: e.setdefault("baseline", kept))
        try:
            evaluate_adapters(base.path, targets, prompts, max_new_tokens=new_tokens,
                              trust_remote_code=base.trust_remote_code, on_result=write)
        except Exception as exc:  # a crash must leave failed entries, never stuck "running" ones
            log.exception("evaluation %s crashed", set_id)
            message = f"{type(exc).__name__}: {exc}"
            for v in group:
                if v.pk not in statuses:
                    _update_entry(v.pk, set_id, lambda e, error=message: e.update(status="failed", error=error,
                                                                                finished_at=now_iso()))
                    statuses[v.pk] = "failed"
    return statuses


def _worker_name() -> str:
    """The Celery worker running this (the Workers page shows it busy), or "" outside a task."""
    from celery import current_task

    return (getattr(current_task.request, "hostname", "") or "") if current_task else ""
