"""Evaluation of adapter versions on a fixed prompt set, with the bare base model as a baseline.

Web side, here (no torch): build a prompt set, record it as queued on each version, queue the Celery task.
Worker side, jobs/services/evaluation_runs.py (task jobs.tasks.evaluate_versions_task): `run_evaluation` loads the
versions, calls finetune.evaluate and writes results as they come; the web process never imports it.

Results live in AdapterVersion.metrics["evaluation"] (the training metrics next to it are never touched):

    {"latest": set_id,                       # the newest non-ad-hoc set, shown by default
     "sets": {set_id: {"name", "kind": "validation|custom|prompt", "status": "queued|running|done|failed",
                       "prompts": [{"prompt", "messages"?, "reference"}], "max_new_tokens",
                       "queued_at", "started_at", "finished_at", "error",
                       "results": [{"output", "exact_match", "token_f1", "rouge_l"}],   # aligned with prompts
                       "summary": {"exact_match", "token_f1", "rouge_l", "scored"},
                       "baseline": {"base_model": {...}, "results": [...], "summary": {...}},
                       "environment": {library versions of the worker}}}}

A set's id is a hash of its prompts and generation length, so the same prompts give the same id on every
version: that is what lines versions (and the baseline) up side by side.
"""
from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from . import queue
from .services import InputError

log = logging.getLogger(__name__)

QUEUE = "gpu"  # a full prompt set: long generation work, behind training like any other gpu work
INTERACTIVE_MAX_PROMPTS = 4  # this few typed prompts (or the prompt box) go to the interactive queue
VALIDATION_PROMPTS = 8
MAX_PROMPTS = 50
MAX_PROMPT_CHARS = 4000
DEFAULT_NEW_TOKENS = 64
MAX_NEW_TOKENS = 512
KEEP_SETS = 8  # per version, besides ad-hoc prompts
KEEP_PROMPT_SETS = 12
STALE_AFTER = timedelta(minutes=30)
ACTIVE = ("queued", "running")


class EvaluationInputError(InputError):
    """Bad evaluation input (prompts, max_new_tokens, no validation prompts): an InputError like any other, so
    pages and the API catch one type."""


# ------------------------------------------------------------------------------------------------ prompt sets


def _clean_text(value, what) -> str:
    if not isinstance(value, str):
        raise EvaluationInputError(f"{what} must be text.")
    value = value.strip()
    if len(value) > MAX_PROMPT_CHARS:
        raise EvaluationInputError(f"{what} is longer than {MAX_PROMPT_CHARS} characters.")
    return value


def clean_prompts(items) -> list[dict]:
    """User prompts: strings, or {"prompt", "reference"?} objects. Raises EvaluationInputError."""
    if not isinstance(items, list) or not items:
        raise EvaluationInputError("prompts must be a non-empty list of strings or {prompt, reference} objects.")
    if len(items) > MAX_PROMPTS:
        raise EvaluationInputError(f"At most {MAX_PROMPTS} prompts at a time.")
    prompts = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or "prompt" not in item:
            raise EvaluationInputError(f"prompts[{i}] must be a string or an object with a 'prompt'.")
        prompt = _clean_text(item["prompt"], f"prompts[{i}].prompt")
        if not prompt:
            raise EvaluationInputError(f"prompts[{i}] is empty.")
        reference = item.get("reference")
        reference = _clean_text(reference, f"prompts[{i}].reference") if reference not in (None, "") else None
        prompts.append({"prompt": prompt, "reference": reference or None})
    return prompts


def prompt_lines(text: str) -> list[dict]:
    """The page's textarea, not yet checked: one prompt per line, optionally 'prompt ||| reference answer'."""
    items = []
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        prompt, _, reference = line.partition("|||")
        items.append({"prompt": prompt.strip(), "reference": reference.strip() or None})
    return items


def choose_prompts(version, typed=None, *, typed_name="your prompts", one_typed_kind="custom"):
    """The one answer to "the user's prompts or the validation set" for pages and API: returns (prompts, name,
    kind). `typed` is what the user gave (the page's textarea through prompt_lines, or the API's list of strings
    or {prompt, reference} objects); none given means the validation prompts of `version`'s dataset, with their
    held-out answers as references. Raises EvaluationInputError."""
    if typed in (None, []):
        return validation_prompts(version), f"validation prompts of {version.dataset.name}", "validation"
    prompts = clean_prompts(typed)
    return prompts, typed_name, one_typed_kind if len(prompts) == 1 else "custom"


def validation_prompts(version, limit: int = VALIDATION_PROMPTS) -> list[dict]:
    """The first prompts of the version's validation split, with the held-out answers as references; without a
    split, the prompts the training run generated for."""
    from finetune.validation import reference_prompts

    prompts = []
    path = version.dataset.validation_path if version.dataset_id else ""
    if path:
        try:
            for context, reference in reference_prompts(path, limit):
                users = [m for m in context if m.get("role") == "user"]
                if not users:
                    continue
                item = {"prompt": users[-1]["content"], "reference": reference}
                if len(context) > 1:
                    item["messages"] = [{"role": m["role"], "content": m["content"]} for m in context]
                prompts.append(item)
        except (OSError, ValueError) as exc:
            log.warning("could not read the validation split of version %s: %s", version.pk, exc)
    if not prompts:
        for gen in version.generations or []:
            if isinstance(gen.get("prompt"), str) and gen["prompt"].strip():
                prompts.append({"prompt": gen["prompt"], "reference": gen.get("reference")})
            if len(prompts) >= limit:
                break
    if not prompts:
        raise EvaluationInputError(
            f"{version.label} has no validation prompts (its dataset has no validation split); give your own prompts."
        )
    return prompts


def set_id_for(prompts: list[dict], max_new_tokens: int) -> str:
    key = json.dumps({"prompts": prompts, "max_new_tokens": max_new_tokens}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def clean_new_tokens(value, default=DEFAULT_NEW_TOKENS) -> int:
    if value in (None, ""):
        return default
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise EvaluationInputError("max_new_tokens must be a whole number.") from None
    if not 1 <= value <= MAX_NEW_TOKENS:
        raise EvaluationInputError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}.")
    return value


# ------------------------------------------------------------------------------------------------ reading


def evaluation_of(version) -> dict:
    ev = (version.metrics or {}).get("evaluation")
    if not isinstance(ev, dict):
        return {"latest": None, "sets": {}}
    ev.setdefault("sets", {})
    ev.setdefault("latest", None)
    return ev


def entry_of(version, set_id) -> dict | None:
    if not set_id:
        return None
    return evaluation_of(version)["sets"].get(set_id)


def is_active(entry) -> bool:
    return bool(entry) and entry.get("status") in ACTIVE


def now_iso() -> str:
    return timezone.now().isoformat()


def _is_stale(entry) -> bool:
    try:
        queued = datetime.fromisoformat(entry.get("started_at") or entry.get("queued_at"))
    except (TypeError, ValueError):
        return True
    return timezone.now() - queued > STALE_AFTER


# ------------------------------------------------------------------------------------------------ queueing


def _prune(sets: dict, keep_id: str):
    def when(item):
        return item[1].get("queued_at") or ""

    for kind, keep in (("prompt", KEEP_PROMPT_SETS), (None, KEEP_SETS)):
        group = [(k, v) for k, v in sets.items() if (v.get("kind") == "prompt") == (kind == "prompt")]
        for key, _ in sorted(group, key=when)[: max(0, len(group) - keep)]:
            if key != keep_id:
                sets.pop(key, None)


def queue_for(prompts: list[dict], kind: str) -> str:
    """Short generations a user waits for never queue behind training: the prompt box, and a few typed prompts."""
    from django.conf import settings

    if kind == "prompt" or (kind == "custom" and len(prompts) <= INTERACTIVE_MAX_PROMPTS):
        return getattr(settings, "INTERACTIVE_QUEUE", "interactive")
    return QUEUE


def queue_evaluation(versions, prompts: list[dict], *, name: str, kind: str = "custom",
                     max_new_tokens: int = DEFAULT_NEW_TOKENS, force: bool = False) -> str:
    """Records the set as queued on every version that lacks fresh results for it and queues one task for
    them. Returns the set id. Versions already done (or on their way) are left alone unless force."""
    from .models import AdapterVersion

    set_id = set_id_for(prompts, max_new_tokens)
    target_queue, queued_at = queue_for(prompts, kind), now_iso()
    # Routing stays in settings: the interactive queue has its own task name (jobs.queue).
    send = queue.send_evaluation if target_queue == QUEUE else queue.send_interactive_evaluation
    ids = sorted({v.pk for v in versions})
    to_run = []
    with transaction.atomic():
        locked = list(AdapterVersion.objects.select_for_update().filter(pk__in=ids).order_by("pk"))
        baselines = {}
        for version in locked:
            entry = entry_of(version, set_id)
            baseline = (entry or {}).get("baseline")
            if baseline and "error" not in baseline and entry.get("status") == "done":
                baselines.setdefault(version.base_model_id, baseline)
        for version in locked:
            metrics = dict(version.metrics or {})
            ev = evaluation_of(version)
            entry = ev["sets"].get(set_id)
            fresh = entry and (entry.get("status") == "done" or (is_active(entry) and not _is_stale(entry)))
            if fresh and not force:
                if kind != "prompt" and ev.get("latest") != set_id:
                    ev["latest"] = set_id
                    version.metrics = {**metrics, "evaluation": ev}
                    version.save(update_fields=["metrics"])
                continue
            new_entry = {
                "name": name,
                "kind": kind,
                "status": "queued",
                "prompts": prompts,
                "max_new_tokens": max_new_tokens,
                "queued_at": queued_at,
                "queue": target_queue,
            }
            if not force and version.base_model_id in baselines:
                new_entry["baseline"] = baselines[version.base_model_id]
            ev["sets"][set_id] = new_entry
            if kind != "prompt":
                ev["latest"] = set_id
            _prune(ev["sets"], set_id)
            version.metrics = {**metrics, "evaluation": ev}
            version.save(update_fields=["metrics"])
            to_run.append(version.pk)
        if to_run:
            transaction.on_commit(lambda: send(to_run, set_id))
    return set_id
