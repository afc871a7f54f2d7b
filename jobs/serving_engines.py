"""The inference server's engines, as the settings list them, and the notes that say which one serves a deployment.

- `build_engines`: settings.TUNEDECK_SERVING_ENGINES, an ordered list of {"ENGINE": dotted path of a
  serving.engine.Engine subclass, "OPTIONS": its keyword arguments}; the first engine that can serve a deployment
  and is available serves it (serving.engine.choose). Default: vLLM, then the built-in engine.
- `note`: writes details["engine"], ["engine_reason"], ["engine_warning"], ["engine_progress"] on a deployment;
  the page and the REST API show them.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from .models import Deployment

log = logging.getLogger("tunedeck.inference")


def build_engines(context, switched_off=()) -> list:
    """The engines of settings.TUNEDECK_SERVING_ENGINES, in order; those named in `switched_off` are there but
    unavailable, so a deployment says why it is not on them."""
    engines = []
    for entry in settings.TUNEDECK_SERVING_ENGINES:
        engine_class = import_string(entry["ENGINE"])
        options = dict(entry.get("OPTIONS") or {})
        if engine_class.name in switched_off:
            options["enabled"] = False
        engines.append(engine_class(context, **options))
    return engines


def note(deployment_id: int, revision: int, *, go_live: bool = False, **fields) -> bool:
    """Merges `fields` into the deployment's details (if it is still at `revision`) and marks it updated, so a
    slow vLLM start is not taken for a missing inference server."""
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().filter(pk=deployment_id, revision=revision).first()
        if deployment is None:
            return False
        details = dict(deployment.details)
        for key, value in fields.items():
            if value is None:
                details.pop(key, None)
            else:
                details[key] = value
        deployment.details = details
        deployment.updated_at = timezone.now()
        # Live and its engine note in one write: a deploy task rewriting the row in between cannot split them.
        if go_live and deployment.status == Deployment.Status.LOADING:
            deployment.status = Deployment.Status.LIVE
        deployment.save(update_fields=["details", "updated_at", "status"])
    return True


class UsageLog:
    """When each deployment last answered a request, kept in the data directory (written at most every
    SAVE_SECONDS), so a restarted inference server starts the most recently used deployments' engines first."""

    SAVE_SECONDS = 30.0

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.times: dict[str, float] = {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self.times = {}
        self.saved_at, self.dirty = 0.0, False

    def touch(self, name: str) -> None:
        self.times[name] = time.time()
        self.dirty = True

    def last_used(self, name: str) -> float:
        return self.times.get(name, 0.0)

    def save(self) -> None:
        if not self.dirty or time.monotonic() - self.saved_at < self.SAVE_SECONDS:
            return
        self.dirty, self.saved_at = False, time.monotonic()
        try:
            partial = self.path.with_suffix(".partial")
            partial.write_text(json.dumps(dict(self.times)))
            os.replace(partial, self.path)
        except OSError as exc:
            log.warning("could not record when deployments were last used: %s", exc)
