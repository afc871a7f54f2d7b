"""Adapter version actions behind the pages and the REST API: mark the line's champion, delete (refused while
deployed)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import ProtectedError

from .models import AdapterLine, AdapterVersion, Deployment

log = logging.getLogger(__name__)

INACTIVE = [Deployment.Status.STOPPED, Deployment.Status.FAILED]


class VersionInUse(Exception):
    """The version has a deployment that is not stopped or failed."""

    def __init__(self, message, deployments):
        super().__init__(message)
        self.deployments = deployments


def set_champion(version: AdapterVersion, *, unset: bool = False) -> AdapterLine:
    """Makes the version its line's champion (or, with unset, clears it if it is the champion)."""
    with transaction.atomic():
        line = AdapterLine.objects.select_for_update().get(pk=version.line_id)
        if unset:
            if line.champion_id == version.pk:
                line.champion = None
                line.save(update_fields=["champion"])
        elif line.champion_id != version.pk:
            line.champion = version
            line.save(update_fields=["champion"])
    version.line = line
    return line


def _inside(path: str, root: Path) -> Path | None:
    if not path:
        return None
    try:
        resolved = Path(path).resolve()
        resolved.relative_to(Path(root).resolve())
    except (OSError, ValueError):
        return None
    return resolved if resolved != Path(root).resolve() else None


def delete_version(version: AdapterVersion) -> None:
    """Deletes the version, its stopped/failed deployments and, after commit, their files on disk. Refused
    (VersionInUse) while a deployment of it is merging, loading or live."""
    with transaction.atomic():
        locked = AdapterVersion.objects.select_for_update().filter(pk=version.pk).first()
        if locked is None:
            return
        deployments = list(Deployment.objects.select_for_update().filter(version=locked))
        active = [d for d in deployments if d.status not in INACTIVE]
        if active:
            names = ", ".join(f"{d.name} ({d.status})" for d in active)
            raise VersionInUse(f"{version.label} is deployed: {names}. Stop the deployment first.", active)
        folders = [p for p in (_inside(d.path, settings.DEPLOYMENT_DIR) for d in deployments) if p]
        adapter = _inside(locked.path, settings.ADAPTER_DIR)
        if adapter:
            folders.append(adapter)
        try:
            Deployment.objects.filter(pk__in=[d.pk for d in deployments]).delete()
            locked.delete()
        except ProtectedError as exc:  # a deployment created meanwhile
            raise VersionInUse(f"{version.label} has just been deployed; stop the deployment first.", []) from exc
        transaction.on_commit(lambda: _remove_folders(folders))


def _remove_folders(folders):
    for folder in folders:
        try:
            shutil.rmtree(folder, ignore_errors=False)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", folder, exc)
